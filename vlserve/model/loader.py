"""Build the model and fill it from Hugging Face safetensors (one file or sharded with an index), or, with
--load-format dummy, with seeded random values made on the device (benchmarks without the weights on disk).

Files are memory-mapped and each parameter's loader reads only the rows/columns its rank keeps. Names are checked
against the model before any tensor data is read.
"""

import json
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from vlserve.config import ModelConfig
from vlserve.errors import CheckpointError
from vlserve.model.qwen2_5_vl import Qwen2_5_VLForCausalLM

# Checkpoints written by transformers 5 nest the parts; map them back to the hub names the model mirrors.
PREFIX_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))
SHARDED_PARAMS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": (0, 1)}


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, progress: bool = True,
               vision_tp_mode: str = "data", load_format: str = "auto") -> Qwen2_5_VLForCausalLM:
    """`load_format` (--load-format, checked by EngineConfig): auto reads the checkpoint, dummy fills random values."""
    with torch.device(device), default_dtype(dtype):
        model = Qwen2_5_VLForCausalLM(cfg, vision_tp_mode)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, cfg.path, progress=progress)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module) -> None:
    """Each parameter in place, scaled as make-tiny's weights: norms near 1, biases small, matrices normal with std
    1/sqrt(fan_in), so activations stay near unit size (finite in fp16/bf16) through every layer."""
    for name, param in model.named_parameters():
        # seeded by name: the same values on every run, and on every rank or stage that holds the tensor
        gen = torch.Generator(param.device).manual_seed(zlib.crc32(name.encode()))
        if not param.dtype.is_floating_point:  # 4-bit packed weights, zero points (and GPTQ's g_idx): any bits
            param.random_(generator=gen)
        elif name.endswith(".scales"):  # 4-bit: (q - z) spans about +-8, so std 1/sqrt(fan_in) over it
            param.uniform_(0.5, 1.0, generator=gen).mul_((param.shape[0] * model_group(model)) ** -0.5 / 5)
        elif param.dim() == 1 and "bias" not in name:  # RMS/LayerNorm weights
            param.normal_(1.0, 0.1, generator=gen)
        elif param.dim() == 1:
            param.normal_(0.0, 0.1, generator=gen)
        else:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=gen)


def model_group(model: torch.nn.Module) -> int:
    return next((m.quant.group_size for m in model.modules() if getattr(m, "quant", None) is not None), 1)


def checkpoint_files(path: str | Path) -> list[Path]:
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) {', '.join(missing)} that are not in {folder}; "
                                  "download the complete checkpoint")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}; vlserve reads Hugging Face safetensors "
                              "checkpoints (re-save .bin weights with save_pretrained(safe_serialization=True))")
    return files


def map_name(hf_name: str, model: Qwen2_5_VLForCausalLM) -> tuple[str, object] | None:
    """Checkpoint tensor name -> (our parameter name, shard id); None for tensors we deliberately skip."""
    for old, new in PREFIX_ALIASES:
        if hf_name.startswith(old):
            hf_name = new + hf_name[len(old):]
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed, never loaded
    if model.cfg.tie_word_embeddings:
        if hf_name == "lm_head.weight":
            return None  # some tied checkpoints store the shared matrix twice
        if hf_name == "model.embed_tokens.weight" and model.lm_head is not None and not model.stage.is_first:
            return "lm_head.weight", None  # a last stage without the embedding still needs the shared matrix
    for part, (ours, shard) in model.packed_modules.items():
        if f".{part}." in hf_name:
            return hf_name.replace(f".{part}.", f".{ours}."), shard
    return hf_name, None


def expected_loads(model: torch.nn.Module) -> set[tuple[str, object]]:
    loads = set()
    for name, _ in model.named_parameters():
        shards = next((s for key, s in SHARDED_PARAMS.items() if f".{key}." in name), (None,))
        loads.update((name, s) for s in shards)
    return loads


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e}; the file is damaged or not safetensors") from e


def load_weights(model: Qwen2_5_VLForCausalLM, path: str | Path, progress: bool = True) -> None:
    params = dict(model.named_parameters())
    plan, unexpected = [], []
    for file in checkpoint_files(path):
        with _open(file) as f:
            for hf_name in f.keys():
                target = map_name(hf_name, model)
                if target is not None and model.on_other_stage(target[0]):
                    continue  # another pipeline stage reads it
                if target is not None and target[0] not in params:
                    unexpected.append(hf_name)
                elif target is not None:
                    plan.append((file, hf_name, *target))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} holds {len(unexpected)} tensor(s) this model does not have, e.g. "
                              f"{', '.join(unexpected[:5])}; check that config.json matches the weights")
    missing = expected_loads(model) - {(name, shard) for _, _, name, shard in plan}
    if missing:
        names = sorted(f"{n}[{s}]" if s is not None else n for n, s in missing)
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"{', '.join(names[:5])}; the checkpoint is incomplete or for another model")
    by_file: dict[Path, list] = {}
    for file, hf_name, name, shard in plan:
        by_file.setdefault(file, []).append((hf_name, name, shard))
    with tqdm(total=len(plan), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for file, items in by_file.items():
            with _open(file) as f:
                for hf_name, name, shard in items:
                    param = params[name]
                    param.weight_loader(param, f.get_slice(hf_name), hf_name, shard)
                    bar.update()
