"""The public Qwen2.5-VL, Qwen2-VL and Qwen3-VL checkpoints' config.json, from their published field values, so
`vlserve plan` answers for a model not downloaded yet: `vlserve plan Qwen2.5-VL-72B-Instruct-AWQ --cluster
2x8xRTX2080Ti`, `vlserve plan Qwen2-VL-7B-Instruct`, `vlserve plan Qwen3-VL-8B-Instruct`."""

import re
from pathlib import Path

from vlserve.config import ModelConfig, parse_config

# size -> hidden, heads, KV heads, MLP width, layers, vocabulary, tied embeddings, vision MLP width
SIZES = {
    "3B": (2048, 16, 2, 11008, 36, 151936, True, 3420),
    "7B": (3584, 28, 4, 18944, 28, 152064, False, 3420),
    "32B": (5120, 40, 8, 27648, 64, 152064, False, 3456),
    "72B": (8192, 64, 8, 29568, 80, 152064, False, 3456),
}
# Qwen2-VL: size -> hidden, heads, KV heads, MLP width, layers, vocabulary, tied embeddings
QWEN2_VL_SIZES = {
    "2B": (1536, 12, 2, 8960, 28, 151936, True),
    "7B": (3584, 28, 4, 18944, 28, 152064, False),
    "72B": (8192, 64, 8, 29568, 80, 152064, False),
}
# Qwen3-VL (head_dim 128, 8 KV heads, vocabulary 151936): size -> hidden, heads, MLP width, layers, tied embeddings,
# and its vision tower: depth, width, MLP width, DeepStack blocks
QWEN3_VL_SIZES = {
    "2B": (2048, 16, 6144, 28, True, 24, 1024, 4096, (5, 11, 17)),
    "4B": (2560, 32, 9728, 36, True, 24, 1024, 4096, (5, 11, 17)),
    "8B": (4096, 32, 12288, 36, False, 27, 1152, 4304, (8, 16, 24)),
    "32B": (5120, 64, 25600, 64, False, 27, 1152, 4304, (8, 16, 24)),
}
AWQ = {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm", "zero_point": True,
       "modules_to_not_convert": ["visual"]}
AWQ_72B_MLP = 29696  # the official 72B AWQ checkpoint pads its MLP to 232 groups of 128


def layout_config(size: str, awq: bool = False, intermediate_size: int | None = None) -> dict:
    """config.json of Qwen2.5-VL-{size}-Instruct (or its AWQ checkpoint)."""
    hidden, heads, kv, mlp, layers, vocab, tied, vision_mlp = SIZES[size]
    if awq and size == "72B":
        mlp = AWQ_72B_MLP
    raw = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": intermediate_size or mlp, "num_hidden_layers": layers, "vocab_size": vocab,
        "tie_word_embeddings": tied, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "torch_dtype": "float16" if awq else "bfloat16",
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": vision_mlp, "num_heads": 16,
                          "out_hidden_size": hidden, "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                          "tokens_per_second": 2, "hidden_act": "silu"},
    }
    if awq:
        raw["quantization_config"] = dict(AWQ)
    return raw


def qwen2_vl_config(size: str) -> dict:
    """config.json of Qwen2-VL-{size}-Instruct: its vision tower is the same at every size."""
    hidden, heads, kv, mlp, layers, vocab, tied = QWEN2_VL_SIZES[size]
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": mlp,
        "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "torch_dtype": "bfloat16",
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": hidden,
                          "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "hidden_act": "quick_gelu"},
    }


def qwen3_vl_config(size: str) -> dict:
    """config.json of Qwen3-VL-{size}-Instruct (or -Thinking: the same layout)."""
    hidden, heads, mlp, layers, tied, depth, width, vision_mlp, deepstack = QWEN3_VL_SIZES[size]
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": tied,
        "text_config": {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": 8,
                        "head_dim": 128, "intermediate_size": mlp, "num_hidden_layers": layers, "vocab_size": 151936,
                        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                        "attention_bias": False, "tie_word_embeddings": tied, "dtype": "bfloat16",
                        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True}},
        "vision_config": {"depth": depth, "hidden_size": width, "intermediate_size": vision_mlp, "num_heads": 16,
                          "out_hidden_size": hidden, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh",
                          "deepstack_visual_indexes": list(deepstack)},
    }


# name pattern -> (sizes, config.json builder)
FAMILY_NAMES = ((r"qwen2-vl-(\d+b)(?:-instruct)?", QWEN2_VL_SIZES, qwen2_vl_config),
                (r"qwen3-vl-(\d+b)(?:-instruct|-thinking)?", QWEN3_VL_SIZES, qwen3_vl_config))


def known_layout(name: str) -> ModelConfig | None:
    """`Qwen2.5-VL-7B-Instruct`, `Qwen/Qwen2.5-VL-72B-Instruct-AWQ`, `Qwen2-VL-2B-Instruct`, `Qwen3-VL-8B-Instruct`,
    ... (case-insensitive); None if not one."""
    key = name.strip().lower().removeprefix("qwen/")
    match = re.fullmatch(r"qwen2\.5-vl-(\d+b)(?:-instruct)?(-awq)?", key)
    if match and match[1].upper() in SIZES:
        return parse_config(layout_config(match[1].upper(), awq=bool(match[2])), name, Path(f"{name} (built-in)"))
    for pattern, sizes, build in FAMILY_NAMES:
        match = re.fullmatch(pattern, key)
        if match and match[1].upper() in sizes:
            return parse_config(build(match[1].upper()), name, Path(f"{name} (built-in)"))
    return None


def load_model_config(model: str) -> ModelConfig:
    """A checkpoint folder's config.json, or, where no such folder exists, a public checkpoint's layout by name."""
    layout = None if Path(model).exists() else known_layout(model)
    return layout or ModelConfig.from_dir(model)
