"""transformers' Qwen2.5-VL, Qwen2-VL and Qwen3-VL (our correctness reference) and their inputs from our prompts."""

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from PIL import Image

from media_samples import make_video_bytes
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.sequence import MediaSpan
from vlserve.media.item import MediaItem


def image_url(width, height, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def video_url(width, height, frames, fps):
    data = base64.b64encode(make_video_bytes(width, height, frames, fps)).decode()
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + data}}


def text(t):
    return {"type": "text", "text": t}


@dataclass
class Prompt:
    token_ids: list[int]  # pads expanded
    spans: list[MediaSpan]  # where the pads sit (a Qwen3-VL video: one span per frame)

    @property
    def media(self) -> list[MediaItem]:
        """The items, in prompt order, each once."""
        return list({id(span.item): span.item for span in self.spans}.values())


def chat_prompt(processor, messages, **kwargs) -> Prompt:
    """The prompt the input processor makes of `messages` (what the engine runs), for the reference to run too."""
    req = processor.chat("reference", messages, SamplingParams(max_tokens=1), **kwargs)
    return Prompt(req.prompt_token_ids, req.media)


def hf_inputs(prompt, cfg):
    ids = torch.tensor([prompt.token_ids])
    kwargs = {"input_ids": ids,
              "mm_token_type_ids": (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()}
    images = [m for m in prompt.media if m.modality == "image"]
    videos = [m for m in prompt.media if m.modality == "video"]
    if images:
        kwargs["pixel_values"] = torch.cat([m.pixel_values for m in images])
        kwargs["image_grid_thw"] = torch.tensor([m.grid_thw for m in images])
    if videos:
        kwargs["pixel_values_videos"] = torch.cat([m.pixel_values for m in videos])
        kwargs["video_grid_thw"] = torch.tensor([m.grid_thw for m in videos])
        if cfg.vision.absolute_time:  # Qwen2.5-VL's; Qwen2-VL counts frames
            kwargs["second_per_grid_ts"] = torch.tensor([m.second_per_grid_t for m in videos])
    return kwargs


def hf_model(ckpt, cfg):
    """transformers' model of the checkpoint's architecture, in fp32."""
    return getattr(transformers, cfg.architecture).from_pretrained(ckpt, dtype=torch.float32).eval()


def dequantized_copy(ckpt, out):
    """The AWQ or GPTQ checkpoint `ckpt` with each quantized layer replaced by its exact dequantized fp32 weight, and no
    quantization_config: what transformers runs as the reference for a quantized checkpoint."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from vlserve.config import ModelConfig
    from vlserve.model.layers import awq, gptq
    from vlserve.model.quantization import QuantConfig

    quant = QuantConfig.of(ModelConfig.from_dir(ckpt).quantization)
    ckpt, out = Path(ckpt), Path(out)
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(file))
    dense = {}
    for name, value in tensors.items():
        if name.endswith(".qweight"):
            base = name.removesuffix("qweight")
            parts = value, tensors[base + "qzeros"], tensors[base + "scales"].float()
            weight = gptq.dequantize(*parts, quant.zero_offset) if quant.method == "gptq" else awq.dequantize(*parts)
            dense[base + "weight"] = weight.t().contiguous()
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            dense[name] = value
    save_file(dense, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out
