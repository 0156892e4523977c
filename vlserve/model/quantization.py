"""Which quantization a checkpoint's config.json names, and what it means for the model's shapes, without torch
(`vlserve plan` reads it too). The tensors' formats and the dequantizing paths are in layers/awq.py and
layers/gptq.py."""

from dataclasses import dataclass

from vlserve.errors import ConfigError

PACK = 8  # 4-bit values per int32
METHODS = ("awq", "gptq")
# The language model's linear layers, the ones a quantized checkpoint stores in 4 bits (the vision tower stays dense)
QUANTIZED = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".o_proj.weight", ".gate_proj.weight",
             ".up_proj.weight", ".down_proj.weight")


def is_quantized_weight(name: str) -> bool:
    """Whether the dense checkpoint tensor `name` is one a quantized checkpoint stores in 4 bits."""
    return name.startswith("model.layers.") and name.endswith(QUANTIZED)


@dataclass(frozen=True)
class QuantConfig:
    """AutoAWQ's 4-bit GEMM format with zero points, or GPTQ's 4-bit format without act-order (desc_act false),
    symmetric or not. The vision tower stays dense (the public checkpoints' modules_to_not_convert)."""

    method: str  # "awq" | "gptq"
    group_size: int
    zero_offset: int = 0  # GPTQ's original ("gptq", v1) format stores each zero point minus one

    @staticmethod
    def of(quantization: dict | None, file: str = "config.json") -> "QuantConfig | None":
        """The checkpoint's quantization_config (None if it has none); a format vlserve cannot read is an error
        that says which."""
        if not quantization:
            return None
        method, bits = quantization.get("quant_method"), quantization.get("bits", 4)
        if method not in METHODS or bits != 4:
            raise ConfigError(f"{file}: quantization {method!r} with {bits} bits: vlserve reads 4-bit AWQ and GPTQ")
        group = quantization.get("group_size", 128)
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % PACK:
            raise ConfigError(f"{file}: quantization_config.group_size {group!r} must be a positive multiple of 8 "
                              "(per-column quantization, -1, is not read)")
        if method == "awq":
            version = str(quantization.get("version", "gemm")).lower()
            if version != "gemm" or quantization.get("zero_point", True) is not True:
                raise ConfigError(f"{file}: AWQ version {version!r}, zero_point {quantization.get('zero_point')!r}: "
                                  "vlserve reads 4-bit GEMM checkpoints with zero points (AutoAWQ's default)")
            return QuantConfig("awq", group)
        if quantization.get("desc_act", False):
            raise ConfigError(f"{file}: GPTQ with desc_act (act-order) reorders each layer's inputs: vlserve reads "
                              "GPTQ checkpoints quantized without it (desc_act false, as Qwen's)")
        offset = 0 if quantization.get("checkpoint_format", "gptq") == "gptq_v2" else 1
        return QuantConfig("gptq", group, offset)


def readable(quantization: dict | None) -> QuantConfig | None:
    """QuantConfig.of, None where the format is one vlserve cannot read (the planner's quantization check says
    so): shapes are then planned as dense."""
    try:
        return QuantConfig.of(quantization)
    except ConfigError:
        return None


def mlp_width(cfg, tp: int) -> int:
    """The MLP width a rank's layers hold: the checkpoint's, or for a quantized one padded up to whole groups per
    rank (the 72B AWQ's 29,568 is 231 groups of 128: at -tp 2 each rank would get 115.5; padded to 29,696 it gets
    116)."""
    quant = readable(cfg.quantization)
    if quant is None:
        return cfg.intermediate_size
    unit = quant.group_size * tp
    return -(-cfg.intermediate_size // unit) * unit
