"""Our forward pass equals transformers' Qwen2_5_VLForConditionalGeneration on the same checkpoint and inputs."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from media_samples import make_video_bytes
from vlserve.config import ModelConfig
from vlserve.media.fetch import MediaPolicy
from vlserve.media.options import MediaOptions
from vlserve.media.positions import mrope_positions
from vlserve.media.template import build_chat_prompt, load_chat_media, load_tokenizer
from vlserve.model.layers.attention import AttentionMetadata
from vlserve.model.loader import load_model

TOLERANCE = 1e-4


def image_url(width, height, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def video_url(width, height, frames, fps):
    data = base64.b64encode(make_video_bytes(width, height, frames, fps)).decode()
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + data}}


def text(t):
    return {"type": "text", "text": t}


CASES = {
    "text": [{"role": "user", "content": "Write a haiku about paged attention."}],
    "one_image": [{"role": "user", "content": [image_url(224, 168, 0), text("What is in this picture?")]}],
    "two_images": [{"role": "system", "content": "You describe images."},
                   {"role": "user", "content": [image_url(300, 90, 1), text("and"), image_url(56, 140, 2),
                                                text("Compare them.")]}],
    # 8 frames at 4 fps -> 4 sampled frames, grid_t 2, temporal positions 0 and 2 (within the spatial extent)
    "one_video": [{"role": "user", "content": [video_url(112, 84, 8, 4.0), text("What happens?")]}],
    "image_and_video": [{"role": "user", "content": [image_url(84, 84, 3), video_url(96, 64, 8, 4.0),
                                                     text("Does the picture appear in the video?")]}],
    "multi_turn": [{"role": "user", "content": [image_url(140, 112, 4), text("Describe it.")]},
                   {"role": "assistant", "content": "A gradient with some noise."},
                   {"role": "user", "content": [image_url(112, 196, 5), text("And this one? 中文 🙂")]}],
}


@pytest.fixture(scope="module", params=["tiny", "tiny_sharded"])
def models(request):
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    cfg = ModelConfig.from_dir(ckpt)
    ours = load_model(cfg, torch.float32, "cpu", progress=False)
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return cfg, load_tokenizer(ckpt), ours, theirs


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
        kwargs["second_per_grid_ts"] = torch.tensor([m.second_per_grid_t for m in videos])
    return kwargs


def our_logits(model, prompts, cfg):
    """All prompts in one flattened forward pass, as the engine will batch them."""
    ids, positions, embeds = [], [], []
    for prompt in prompts:
        ids += prompt.token_ids
        positions.append(mrope_positions(prompt.token_ids, prompt.media, cfg)[0])
        embeds += model.encode_media(prompt.media)
    meta = AttentionMetadata.from_lengths([len(p.token_ids) for p in prompts])
    hidden = model(torch.tensor(ids), torch.cat(positions, dim=1), meta, torch.cat(embeds) if embeds else None)
    return model.compute_logits(hidden).split([len(p.token_ids) for p in prompts])


def build(models, case):
    cfg, tokenizer, _, _ = models
    media = load_chat_media(CASES[case], MediaPolicy(), MediaOptions(), cfg)
    return build_chat_prompt(tokenizer, cfg, CASES[case], media)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_logits_equal_transformers(models, case):
    cfg, _, ours, theirs = models
    prompt = build(models, case)
    expected = theirs(**hf_inputs(prompt, cfg)).logits[0]
    (got,) = our_logits(ours, [prompt], cfg)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@torch.no_grad()
def test_batched_prompts_equal_one_at_a_time(models):
    cfg, _, ours, _ = models
    prompts = [build(models, case) for case in ("two_images", "text", "image_and_video")]
    batched = our_logits(ours, prompts, cfg)
    for prompt, logits in zip(prompts, batched):
        (alone,) = our_logits(ours, [prompt], cfg)
        assert (logits - alone).abs().max().item() <= 1e-5
