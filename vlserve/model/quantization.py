"""Which quantization a checkpoint's config.json names, and what it means for the model's shapes, without torch
(`vlserve plan` reads it too). The tensors' format and the dequantizing path are in layers/awq.py."""

from dataclasses import dataclass

from vlserve.errors import ConfigError

PACK = 8  # 4-bit values per int32


@dataclass(frozen=True)
class AwqConfig:
    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()  # the public checkpoints keep "visual" dense: vlserve always does

    @staticmethod
    def of(quantization: dict | None, file: str = "config.json") -> "AwqConfig | None":
        """The checkpoint's quantization_config, if it is AWQ's 4-bit GEMM with zero points; other quantizations
        are the planner's to refuse."""
        if not quantization or quantization.get("quant_method") != "awq":
            return None
        bits, version = quantization.get("bits", 4), str(quantization.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or quantization.get("zero_point", True) is not True:
            raise ConfigError(f"{file}: AWQ with bits {bits}, version {version!r}, zero_point "
                              f"{quantization.get('zero_point')!r}: vlserve reads 4-bit GEMM checkpoints with zero "
                              "points (AutoAWQ's default, the public Qwen ones)")
        group = quantization.get("group_size", 128)
        if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % PACK:
            raise ConfigError(f"{file}: quantization_config.group_size {group!r} must be a positive multiple of 8")
        return AwqConfig(group, tuple(quantization.get("modules_to_not_convert") or ()))


def mlp_width(cfg, tp: int) -> int:
    """The MLP width a rank's layers hold: the checkpoint's, or for AWQ padded up to whole groups per rank (the
    72B's 29,568 is 231 groups of 128: at -tp 2 each rank would get 115.5; padded to 29,696 it gets 116)."""
    quant = AwqConfig.of(cfg.quantization)
    if quant is None:
        return cfg.intermediate_size
    unit = quant.group_size * tp
    return -(-cfg.intermediate_size // unit) * unit
