"""Configuration read from a checkpoint folder, plus the dtype rule.

Config flows one way: `ModelConfig.from_dir` reads `config.json` once; everything else takes the dataclass.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlserve.errors import ConfigError
from vlserve.media.fetch import MediaPolicy
from vlserve.media.options import CLIP_MEAN, CLIP_STD, MediaOptions, grid_tokens

# The model registry: the architecture picks the vision tower's parts and the video rules (_parse_vision) and the
# language model's (parse_config: q/k norm, attention bias, interleaved M-RoPE); one model class (qwen2_5_vl.py)
# builds all of them from the flags
VL_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                    "Qwen3VLForConditionalGeneration")
QWEN3_VL = "Qwen3VLForConditionalGeneration"
# make-tiny's --family -> (architecture, model_type, processor class)
FAMILIES = {"qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "Qwen2_5_VLProcessor"),
            "qwen2-vl": ("Qwen2VLForConditionalGeneration", "qwen2_vl", "Qwen2VLProcessor"),
            "qwen3-vl": (QWEN3_VL, "qwen3_vl", "Qwen3VLProcessor")}
TEXT_ARCHITECTURES = ("Qwen2ForCausalLM",)
DEFAULT_STOP_TOKEN_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
VISION_TP_MODES = ("data", "weights")  # --mm-encoder-tp-mode
EXECUTOR_BACKENDS = ("local", "mp", "ray")  # one process | spawned processes on this machine | Ray actors
LOAD_FORMATS = ("auto", "dummy")  # --load-format: the checkpoint's safetensors | random weights, none read


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int | None = 112  # None: every block attends over whole frames (Qwen2-VL)
    tokens_per_second: float = 2.0
    hidden_act: str = "silu"
    norm: str = "rms"  # "rms" (Qwen2.5-VL) | "layer" (LayerNorm with bias, Qwen2-VL)
    mlp: str = "gated"  # "gated" (gate/up/down, SiLU) | "fc" (fc1, hidden_act, fc2: Qwen2-VL) | "linear_fc" (Qwen3-VL)
    absolute_time: bool = True  # video frames' temporal positions in seconds (Qwen2.5-VL) or frame indexes
    # Qwen3-VL: each video frame its own run of pads after a "<1.5 seconds>" text timestamp (all at temporal 0)
    timestamps: bool = False
    merger: str = "mlp"  # "mlp" (merger.ln_q, merger.mlp.0/2) | "linear" (merger.norm, linear_fc1/2: Qwen3-VL)
    patch_bias: bool = False  # the patch embedding's Conv3d has a bias (Qwen3-VL)
    num_position_embeddings: int | None = None  # a learned square grid of positions, resampled per image (Qwen3-VL)
    deepstack_visual_indexes: tuple[int, ...] = ()  # blocks whose features feed the first LM layers (Qwen3-VL)
    image_mean: tuple[float, float, float] = CLIP_MEAN  # the family's processor's normalization
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embed_width(self) -> int:
        """Columns of one media token's embedding: the merger's output, then one per DeepStack merger."""
        return self.out_hidden_size * (1 + len(self.deepstack_visual_indexes))

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str | None
    vision: VisionConfig | None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    quantization: dict | None = None
    random_weights: bool = False  # written by `vlserve make-tiny` (RANDOM_WEIGHTS_KEY): its answers are noise
    head_size: int | None = None  # config.json's head_dim where it is not hidden_size / heads (Qwen3-VL)
    attention_bias: bool = True  # q/k/v projections with bias (Qwen2's; Qwen3's have none)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary (Qwen3)
    mrope_interleaved: bool = False  # M-RoPE pairs cycle t, h, w (Qwen3-VL) instead of three contiguous sections

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_attention_heads

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not Path(path).is_dir():
            raise ConfigError(f"model folder {path} does not exist; pass a folder holding a Hugging Face checkpoint")
        if not file.is_file():
            raise ConfigError(f"{file} is missing; a Hugging Face checkpoint folder holds config.json beside its "
                              "weights")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{file} must hold a JSON object")
        return parse_config(raw, str(path), file)


RANDOM_WEIGHTS_KEY = "vlserve_random_weights"  # in config.json: a checkpoint of random weights (make-tiny's)


def parse_config(raw: dict, path: str, file: Path) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in VL_ARCHITECTURES + TEXT_ARCHITECTURES:
        known = ", ".join(VL_ARCHITECTURES + TEXT_ARCHITECTURES)
        raise ConfigError(f"{file}: field 'architectures' is {archs!r}; vlserve serves {known}")
    # Checkpoints saved by newer transformers nest the text fields under text_config.
    text = {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw
    field = _FieldReader(text, file)
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    head_size = field.int("head_dim") if "head_dim" in text else None
    head_dim = head_size or field.int("hidden_size") // max(field.int("num_attention_heads"), 1)
    mrope = tuple(rope.get("mrope_section") or _default_mrope_section(head_dim))
    qwen3 = arch == QWEN3_VL
    cfg = ModelConfig(
        path=path,
        architecture=arch,
        vocab_size=field.int("vocab_size"),
        hidden_size=field.int("hidden_size"),
        intermediate_size=field.int("intermediate_size"),
        num_hidden_layers=field.int("num_hidden_layers"),
        num_attention_heads=field.int("num_attention_heads"),
        num_key_value_heads=field.int("num_key_value_heads", field.int("num_attention_heads")),
        rms_norm_eps=field.float("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta") or field.float("rope_theta", 1e6)),
        mrope_section=mrope,
        max_position_embeddings=field.int("max_position_embeddings", 32768),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        vision=_parse_vision(raw.get("vision_config"), file, arch) if arch in VL_ARCHITECTURES else None,
        image_token_id=int(raw.get("image_token_id", 151655)),
        video_token_id=int(raw.get("video_token_id", 151656)),
        vision_start_token_id=int(raw.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(raw.get("vision_end_token_id", 151653)),
        quantization=raw.get("quantization_config"),
        random_weights=raw.get(RANDOM_WEIGHTS_KEY) is True,
        head_size=head_size,
        attention_bias=bool(text.get("attention_bias", not qwen3)),
        qk_norm=qwen3,
        mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
    )
    _check(cfg, file)
    return cfg


def _default_mrope_section(head_dim: int) -> list[int]:
    # Text-only checkpoints use plain RoPE; any split works because all three position rows are equal.
    half = head_dim // 2
    return [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]


def _parse_vision(raw: Any, file: Path, arch: str) -> VisionConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: field 'vision_config' is missing; a {arch} checkpoint needs it")
    field = _FieldReader(raw, file, prefix="vision_config.")
    if arch == "Qwen2VLForConditionalGeneration":
        return _parse_qwen2_vision(raw, field)
    if arch == QWEN3_VL:
        return _parse_qwen3_vision(raw, field)
    return VisionConfig(
        depth=field.int("depth"),
        hidden_size=field.int("hidden_size"),
        intermediate_size=field.int("intermediate_size"),
        num_heads=field.int("num_heads"),
        out_hidden_size=field.int("out_hidden_size"),
        fullatt_block_indexes=tuple(int(i) for i in raw.get("fullatt_block_indexes", (7, 15, 23, 31))),
        in_channels=field.int("in_chans", field.int("in_channels", 3)),
        patch_size=field.int("patch_size", 14),
        temporal_patch_size=field.int("temporal_patch_size", 2),
        spatial_merge_size=field.int("spatial_merge_size", 2),
        window_size=field.int("window_size", 112),
        tokens_per_second=field.float("tokens_per_second", 2.0),
        hidden_act=str(raw.get("hidden_act", "silu")),
    )


def _parse_qwen2_vision(raw: dict, field: "_FieldReader") -> VisionConfig:
    """Qwen2-VL's tower: `embed_dim` wide, an fc1/fc2 MLP `mlp_ratio` times wider, LayerNorms, no windows; its
    `hidden_size` is the merger's output (the language model's width)."""
    width, depth = field.int("embed_dim"), field.int("depth")
    return VisionConfig(
        depth=depth, hidden_size=width, intermediate_size=int(width * field.float("mlp_ratio", 4)),
        num_heads=field.int("num_heads"), out_hidden_size=field.int("hidden_size"),
        fullatt_block_indexes=tuple(range(depth)), in_channels=field.int("in_chans", field.int("in_channels", 3)),
        patch_size=field.int("patch_size", 14), temporal_patch_size=field.int("temporal_patch_size", 2),
        spatial_merge_size=field.int("spatial_merge_size", 2), window_size=None,
        hidden_act=str(raw.get("hidden_act", "quick_gelu")), norm="layer", mlp="fc", absolute_time=False,
    )


def _parse_qwen3_vision(raw: dict, field: "_FieldReader") -> VisionConfig:
    """Qwen3-VL's tower: patches of 16 with a biased embedding plus learned positions, LayerNorms, a
    linear_fc1/fc2 MLP (GELU tanh), whole-frame attention, DeepStack mergers; normalized to [-1, 1]."""
    depth = field.int("depth")
    return VisionConfig(
        depth=depth, hidden_size=field.int("hidden_size"), intermediate_size=field.int("intermediate_size"),
        num_heads=field.int("num_heads"), out_hidden_size=field.int("out_hidden_size"),
        fullatt_block_indexes=tuple(range(depth)), in_channels=field.int("in_channels", 3),
        patch_size=field.int("patch_size", 16), temporal_patch_size=field.int("temporal_patch_size", 2),
        spatial_merge_size=field.int("spatial_merge_size", 2), window_size=None,
        hidden_act=str(raw.get("hidden_act", "gelu_pytorch_tanh")), norm="layer", mlp="linear_fc",
        absolute_time=False, timestamps=True, merger="linear", patch_bias=True,
        num_position_embeddings=field.int("num_position_embeddings"),
        deepstack_visual_indexes=tuple(int(i) for i in raw.get("deepstack_visual_indexes", ())),
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    )


class _FieldReader:
    """Reads typed fields; a missing or wrong-typed field is an error naming the file and field."""

    def __init__(self, raw: dict, file: Path, prefix: str = ""):
        self.raw, self.file, self.prefix = raw, file, prefix

    def int(self, name: str, default: int | None = None) -> int:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{self.file}: field '{self.prefix}{name}' must be a positive integer, got {value!r}")
        return value

    def float(self, name: str, default: float | None = None) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{self.file}: field '{self.prefix}{name}' must be a positive number, got {value!r}")
        return float(value)


def _check(cfg: ModelConfig, file: Path) -> None:
    def fail(field: str, why: str):
        raise ConfigError(f"{file}: field '{field}' is inconsistent: {why}")

    if cfg.head_size is None and cfg.hidden_size % cfg.num_attention_heads:
        fail("hidden_size", f"{cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        fail(
            "num_key_value_heads",
            f"num_attention_heads {cfg.num_attention_heads} is not a multiple of {cfg.num_key_value_heads}",
        )
    if cfg.head_dim % 2 or sum(cfg.mrope_section) * 2 != cfg.head_dim or len(cfg.mrope_section) != 3:
        fail("rope_scaling.mrope_section", f"{list(cfg.mrope_section)} must be 3 numbers summing to head_dim/2")
    v = cfg.vision
    if v is None:
        return
    if v.hidden_size % v.num_heads or v.head_dim % 4:
        fail("vision_config.num_heads", f"hidden_size {v.hidden_size} / {v.num_heads} heads must be a multiple of 4")
    if v.out_hidden_size != cfg.hidden_size:
        fail("vision_config.out_hidden_size", f"{v.out_hidden_size} differs from hidden_size {cfg.hidden_size}")
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        indexes = getattr(v, name)
        if any(not 0 <= i < v.depth for i in indexes):
            fail(f"vision_config.{name}", f"{list(indexes)} must lie in [0, {v.depth})")
    if len(v.deepstack_visual_indexes) > cfg.num_hidden_layers:
        fail("vision_config.deepstack_visual_indexes", f"{len(v.deepstack_visual_indexes)} DeepStack features need "
             f"as many language-model layers, the model has {cfg.num_hidden_layers}")
    grid = v.num_position_embeddings
    if grid is not None and math.isqrt(grid) ** 2 != grid:
        fail("vision_config.num_position_embeddings", f"{v.num_position_embeddings} is not a square grid")
    unit = v.patch_size * v.spatial_merge_size
    if v.window_size is not None and v.window_size % unit:
        fail("vision_config.window_size", f"{v.window_size} is not a multiple of patch_size*spatial_merge_size {unit}")


DTYPES = {"float16": "float16", "half": "float16", "bfloat16": "bfloat16", "float32": "float32", "float": "float32"}


def choose_dtype(name: str, capability: tuple[int, int] | None, card: str = "this GPU",
                 checkpoint_dtype: str | None = None) -> tuple[str, str]:
    """The --dtype rule, for a card of `capability` (None: the CPU): auto = bf16 on compute capability >= 8.0, fp16
    below it (bf16 asked there becomes fp16 too), fp32 on CPU. Returns (dtype name, why); the planner and the
    engine both use it, and torch need not be imported."""
    if name != "auto" and name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of auto, float16, bfloat16, float32")
    if capability is None:
        return ("float32", "auto: float32 on the CPU") if name == "auto" else (DTYPES[name], f"--dtype {name}")
    version = ".".join(map(str, capability))
    if name == "auto" and capability >= (8, 0):
        return "bfloat16", f"auto: {card} (compute capability {version}) computes in bfloat16"
    if name == "auto" or DTYPES[name] == "bfloat16" and capability < (8, 0):
        asked = "auto:" if name == "auto" else "--dtype bfloat16 asked, but"
        source = f" (the checkpoint is {checkpoint_dtype})" if checkpoint_dtype else ""
        return "float16", (f"{asked} {card} (compute capability {version}) has no bfloat16 (it needs 8.0), so "
                           f"float16{source}, with the vision tower's fp16 overflow clamp")
    return DTYPES[name], f"--dtype {name}"


def resolve_dtype(name: str, device) -> "torch.dtype":  # noqa: F821 (torch is imported here only, see choose_dtype)
    """The torch dtype choose_dtype picks for `device` (a torch.device or its name)."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if cuda else None
    card = torch.cuda.get_device_name(device) if cuda else "the CPU"
    return getattr(torch, choose_dtype(name, capability, card)[0])


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 8192  # tokens (prefill chunks + decodes) in one step
    max_model_len: int = 32768  # prompt + output tokens of one sequence
    enable_chunked_prefill: bool = True
    # Schedule a sequence again while its last step is in flight (its new token still on the device). Only where
    # the steps run in order on one stream: a later step's KV writes then come after an earlier step's.
    async_scheduling: bool = False
    # Media tokens whose images/videos a step may encode (the encoder budget); None: no limit (text-only models)
    max_num_encoder_tokens: int | None = None

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_num_encoder_tokens"):
            value = getattr(self, name)
            if name == "max_num_encoder_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"--max-num-batched-tokens {self.max_num_batched_tokens} is below --max-model-len "
                f"{self.max_model_len}: without chunked prefill a whole prompt must fit one step; raise it or "
                "enable chunked prefill")


def resolve_model_path(model: str) -> str:
    """A folder on this machine as an absolute path (a relative one means nothing to another node or folder);
    anything else as given (a Hugging Face name: the engine finds it in the hub's cache when it starts,
    model/hub.py)."""
    expanded = os.path.expanduser(model)
    return os.path.abspath(expanded) if os.path.exists(expanded) else model


def is_hub_name(model: str) -> bool:
    """"Qwen/Qwen2.5-VL-7B-Instruct": an organisation and a name, and no path on this machine."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None and not model.startswith((".", "~"))
            and not os.path.exists(model))


# Knobs `vlserve plan` chooses and the engine may tighten, one step at a time, when the model would not fit
# otherwise (plan/planner.py's ladder); only those the user left unset (EngineConfig.tunable).
TUNABLE = frozenset({"tensor_parallel_size", "pipeline_parallel_size", "mm_encoder_tp_mode",
                     "max_num_batched_tokens", "max_pixels", "gpu_memory_utilization", "max_num_seqs"})


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs, built once from flags or `LLM(...)` arguments and passed down unchanged."""

    model: str
    dtype: str = "auto"
    device: str = "auto"  # cuda when a GPU is visible, else cpu
    seed: int = 0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: max(8192, max_model_len) without chunking, else 8192
    enable_chunked_prefill: bool = True
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_gib: float | None = None  # CPU: memory for the KV cache; None: sized by the planner
    gpu_memory_utilization: float = 0.9  # GPU: fraction of the card's memory vlserve may use in total
    num_gpu_blocks_override: int | None = None
    vision_cache_mib: int = 512  # encoded images/videos kept for reuse (multi-turn chats)
    # media tokens (one per merged patch group) whose items one step may encode; None: the largest image's, what the
    # profiling step encodes (a single larger item, a long video, still runs alone)
    max_num_encoder_tokens: int | None = None
    limit_mm_per_prompt: tuple[tuple[str, int], ...] = (("image", 16), ("video", 4))
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pp_layer_partition: tuple[int, ...] | None = None  # layers per stage; None: an even split
    # A collective waiting longer than this fails instead of hanging; Ray waits as long for the cluster's slots
    distributed_timeout_s: float = 600.0
    mm_encoder_tp_mode: str = "data"  # vision tower under TP: data (whole per rank, images spread) or weights (split)
    distributed_executor_backend: str | None = None  # local | mp | ray; None: see executor.choose_backend
    enforce_eager: bool = False  # no CUDA graphs: every decode step runs the model eagerly
    async_scheduling: bool = True  # schedule step N+1 while step N runs (one rank; see engine/core.py)
    media: MediaOptions = MediaOptions()  # preprocessing defaults (--mm-processor-kwargs)
    media_policy: MediaPolicy = MediaPolicy()  # where media may come from (--allowed-local-media-path, ...)
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random ones (only config + tokenizer read)
    tokenizer: str | None = None  # a folder holding the tokenizer; None: the checkpoint's own
    download_dir: str | None = None  # the Hugging Face cache a model name is looked up (and downloaded) in
    quantization: str | None = None  # checked against the checkpoint's quantization_config (vLLM's flag)
    chat_template: str | None = None  # a .jinja file or the template's text, in place of the checkpoint's
    # Of TUNABLE, the knobs the user left unset (flags not given): the planner may tighten them to fit before
    # anything loads (plan/preflight.py: settle). Empty (LLM(...)'s default): every value is used as given.
    tunable: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "model", resolve_model_path(self.model))  # every node and /v1/models see one path
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", resolve_model_path(self.tokenizer))

        def positive(flag: str, value, allow_none: bool = False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{flag} must be a positive number, got {value!r}")

        positive("--max-model-len", self.max_model_len, allow_none=True)
        positive("--max-num-seqs", self.max_num_seqs)
        positive("--max-num-batched-tokens", self.max_num_batched_tokens, allow_none=True)
        positive("--kv-cache-memory-gib", self.kv_cache_memory_gib, allow_none=True)
        positive("--num-gpu-blocks-override", self.num_gpu_blocks_override, allow_none=True)
        positive("--vision-cache-mib", self.vision_cache_mib)
        positive("--max-num-encoder-tokens", self.max_num_encoder_tokens, allow_none=True)
        positive("--tensor-parallel-size", self.tensor_parallel_size)
        positive("--pipeline-parallel-size", self.pipeline_parallel_size)
        partition = self.pp_layer_partition
        if partition is not None and (len(partition) != self.pipeline_parallel_size or min(partition) < 1):
            raise ConfigError(f"--pp-layer-partition {','.join(map(str, partition))} must give each of the "
                              f"{self.pipeline_parallel_size} stages (--pipeline-parallel-size) at least one layer")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise ConfigError(f"--distributed-executor-backend {self.distributed_executor_backend!r} must be one of "
                              f"{', '.join(EXECUTOR_BACKENDS)}")
        if self.distributed_executor_backend == "local" and self.world_size > 1:
            raise ConfigError("--distributed-executor-backend local runs one process; with --tensor-parallel-size or "
                              "--pipeline-parallel-size above 1 use mp (one machine) or ray (several)")
        if self.mm_encoder_tp_mode not in VISION_TP_MODES:
            raise ConfigError(f"--mm-encoder-tp-mode {self.mm_encoder_tp_mode!r} must be data or weights")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"--load-format {self.load_format!r} must be auto (read the checkpoint's safetensors) "
                              "or dummy (random weights; only config.json and the tokenizer files are read)")
        if self.block_size <= 0 or self.block_size % 16:
            raise ConfigError(f"--block-size {self.block_size} must be a positive multiple of 16")
        if not set(self.tunable) <= TUNABLE:
            raise ConfigError(f"tunable knobs {sorted(set(self.tunable) - TUNABLE)} are not among "
                              f"{', '.join(sorted(TUNABLE))}")

    @property
    def world_size(self) -> int:
        """Ranks: one process (one GPU) per tensor-parallel rank of each pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.model

    def model_len(self, model_cfg: ModelConfig) -> int:
        """Prompt plus output tokens per sequence: --max-model-len, else what the model was trained for."""
        return self.max_model_len or model_cfg.max_position_embeddings

    def encoder_tokens(self, model_cfg: ModelConfig) -> int | None:
        """--max-num-encoder-tokens, or its default: the tokens of the largest image the media options allow."""
        if self.max_num_encoder_tokens or model_cfg.vision is None:
            return self.max_num_encoder_tokens
        options = self.media.for_vision(model_cfg.vision)
        return grid_tokens(options.largest_image_grid(), options.merge_size)

    def batched_tokens(self, max_model_len: int) -> int:
        """--max-num-batched-tokens, or its default: 8192 per step; a whole prompt when prefill is not chunked."""
        return self.max_num_batched_tokens or (8192 if self.enable_chunked_prefill else max(8192, max_model_len))

    def resolved_device(self) -> "torch.device":  # noqa: F821 (imported here: reading configs needs no torch)
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device} asked for, but torch sees no CUDA GPU; use --device cpu")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device {self.device!r} must be auto, cpu or cuda[:N]")
        return torch.device(self.device)


def stage_layers(num_layers: int, num_stages: int, stage: int, partition: tuple[int, ...] | None = None) -> range:
    """Layers of a pipeline stage: `partition` (layers per stage, --pp-layer-partition), else an even split with
    the first stages taking one layer more."""
    if partition:
        start = sum(partition[:stage])
        return range(start, start + partition[stage])
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def valid_tensor_parallel_sizes(cfg: ModelConfig, up_to: int = 64) -> list[int]:
    """Sizes that split attention heads, KV heads (or replicate them evenly) and the MLP across ranks."""
    kv = cfg.num_key_value_heads
    return [t for t in range(1, up_to + 1)
            if cfg.num_attention_heads % t == 0 and (kv % t == 0 or t % kv == 0) and cfg.intermediate_size % t == 0]


def valid_vision_tensor_parallel_sizes(v: VisionConfig, up_to: int = 64) -> list[int]:
    """Sizes that split the vision tower's heads and MLP (then the merger's input, 4x hidden, splits too)."""
    return [t for t in range(1, up_to + 1) if v.num_heads % t == 0 and v.intermediate_size % t == 0]
