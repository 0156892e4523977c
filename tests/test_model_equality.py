"""Our forward pass equals transformers' (Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration,
Qwen3VLForConditionalGeneration) on the same checkpoint and inputs."""

import pytest
import torch

from hf_reference import chat_prompt, hf_inputs, hf_model, image_url, text, video_url
from vlserve.config import EngineConfig, ModelConfig
from vlserve.inputs import InputProcessor
from vlserve.media.positions import mrope_positions
from vlserve.model.layers.attention import AttentionMetadata
from vlserve.model.loader import load_model

TOLERANCE = 1e-4


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
    # a video before an image: one vision pass over both must keep each frame's attention span apart
    "video_then_image": [{"role": "user", "content": [video_url(84, 112, 8, 4.0), image_url(112, 84, 6),
                                                      text("Same scene?")]}],
    "multi_turn": [{"role": "user", "content": [image_url(140, 112, 4), text("Describe it.")]},
                   {"role": "assistant", "content": "A gradient with some noise."},
                   {"role": "user", "content": [image_url(112, 196, 5), text("And this one? 中文 🙂")]}],
}


@pytest.fixture(scope="module", params=["tiny", "tiny_sharded", "qwen2_vl", "qwen2_vl_sharded", "qwen3_vl",
                                        "qwen3_vl_sharded"])
def models(request, device):
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    cfg = ModelConfig.from_dir(ckpt)
    ours = load_model(cfg, torch.float32, device, progress=False)
    theirs = hf_model(ckpt, cfg)
    return cfg, InputProcessor.for_model(EngineConfig(model=str(ckpt))), ours, theirs


def our_logits(model, prompts, cfg):
    """All prompts in one flattened forward pass, as the engine will batch them."""
    ids, positions, embeds = [], [], []
    for prompt in prompts:
        ids += prompt.token_ids
        positions.append(mrope_positions(len(prompt.token_ids), prompt.spans, cfg)[0])
        embeds += model.encode_media(prompt.media)
    meta = AttentionMetadata.from_lengths([len(p.token_ids) for p in prompts])
    device = model.lm_head.weight.device
    ids = torch.tensor(ids, device=device)
    media_embeds = torch.cat(embeds) if embeds else None
    hidden = model(ids, torch.cat(positions, dim=1).to(device), meta, media_embeds, model.media_rows(ids))
    return [logits.cpu() for logits in model.compute_logits(hidden).split([len(p.token_ids) for p in prompts])]


def build(models, case):
    cfg, processor, _, _ = models
    return chat_prompt(processor, CASES[case])


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


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl_sharded"])
def family_llm(request, device):
    """The engine (LLM) and transformers on a Qwen2-VL and a Qwen3-VL checkpoint (Qwen2.5-VL's: test_engine.py)."""
    from vlserve import LLM

    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    llm = LLM(str(ckpt), device=device, dtype="float32", max_model_len=2048, progress=False)
    yield llm, hf_model(ckpt, llm.core.model_config)
    llm.shutdown()


@pytest.mark.parametrize("case", ["text", "two_images", "image_and_video", "multi_turn"])
@torch.no_grad()
def test_greedy_tokens_equal_generate(family_llm, case):
    from vlserve import SamplingParams

    llm, hf = family_llm
    out = llm.chat([CASES[case]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    prompt = chat_prompt(llm.inputs, CASES[case])
    expected = hf.generate(**hf_inputs(prompt, llm.core.model_config), max_new_tokens=8, do_sample=False)
    assert out.outputs[0].token_ids == expected[0, len(prompt.token_ids):].tolist()


def test_prefix_cache_and_chunked_prefill_keep_the_tokens(family_llm, device):
    """A prompt with an image and a video (Qwen3-VL: one span per frame, each after its timestamp) gives the same
    tokens served again from the prefix cache, and prefilled 32 tokens a step (spans cut across steps)."""
    from vlserve import LLM, SamplingParams

    llm, _ = family_llm
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first, again = (llm.chat([CASES["image_and_video"]], params, use_tqdm=False)[0] for _ in range(2))
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    with LLM(llm.core.model_config.path, device=device, dtype="float32", max_model_len=2048, progress=False,
             max_num_batched_tokens=32, enable_prefix_caching=False) as chunked:
        out = chunked.chat([CASES["image_and_video"]], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == first.outputs[0].token_ids
