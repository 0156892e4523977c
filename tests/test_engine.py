"""The engine's greedy outputs equal transformers' greedy generate (one prompt at a time), under settings that
force chunked prefill, fewer seats than prompts, preemption and prefix-cache hits; and no KV block leaks."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from hf_reference import chat_prompt, hf_inputs, image_url, text, video_url
from vlserve import LLM, SamplingParams
from vlserve.errors import InvalidRequestError

MAX_NEW = 10
LONG_SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 12}  # a shared ~90-token prefix
PICTURE = image_url(224, 168, 7)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [LONG_SYSTEM, {"role": "user", "content": "Name three prime numbers."}],
    [LONG_SYSTEM, {"role": "user", "content": "Name three colours, then three animals, then three fruits."}],
    [{"role": "user", "content": [PICTURE, text("What is in this picture?")]}],
    [{"role": "user", "content": [PICTURE, text("Describe the colours.")]}],  # same image: prefix + vision cache
    [{"role": "user", "content": [image_url(300, 90, 1), text("and"), image_url(56, 140, 2), text("Compare.")]}],
    [{"role": "user", "content": [video_url(112, 84, 8, 4.0), text("What happens?")]}],
    [{"role": "user", "content": [PICTURE, text("Describe it.")]}, {"role": "assistant", "content": "A gradient."},
     {"role": "user", "content": [image_url(112, 196, 5), text("And this one? 中文 🙂")]}],
]

SETTINGS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 32},
    "few_seats": {"max_num_seqs": 3},
    "preemption": {"num_gpu_blocks_override": 40, "max_num_seqs": 8},  # 40 x 16 tokens: not all 8 fit at once
    "no_prefix_cache": {"enable_prefix_caching": False, "max_num_batched_tokens": 48},
    "encoder_budget": {"max_num_encoder_tokens": 8},  # every image is larger: one image (or video) a step
}


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """transformers' greedy tokens and per-step logits for each conversation, one at a time."""
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    refs = []
    for conversation in CONVERSATIONS:
        prompt = chat_prompt(llm.inputs, conversation)
        out = hf.generate(**hf_inputs(prompt, llm.core.model_config), max_new_tokens=MAX_NEW, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
        tokens = out.sequences[0, len(prompt.token_ids):].tolist()
        refs.append((tokens, torch.cat(out.logits).log_softmax(-1)))
    return refs


def assert_no_leaks(llm):
    bm = llm.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.core.requests and not llm.core.scheduler.has_unfinished() and not llm.outputs.has_unfinished()


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_greedy_equals_transformers(tiny_ckpt, reference, setting, device):
    # On a GPU, a fixed KV cache: a tiny model's blocks are tiny (millions would fit), and other tests hold memory
    memory = {"num_gpu_blocks_override": 1024} if device.startswith("cuda") else {}
    llm = LLM(str(tiny_ckpt), device=device, dtype="float32", progress=False, **(memory | SETTINGS[setting]))
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=3)
    outputs = llm.chat(CONVERSATIONS, params, use_tqdm=False)
    for out, (tokens, logprobs) in zip(outputs, reference):
        got = out.outputs[0]
        assert got.token_ids == tokens
        assert got.finish_reason in ("length", "stop")
        for step, lp in enumerate(got.logprobs):
            assert abs(lp.logprob - logprobs[step, tokens[step]].item()) <= 1e-4
            top_ids = [t for t, _ in lp.top]
            assert top_ids == logprobs[step].topk(3).indices.tolist()
    if setting == "preemption":
        assert llm.core.scheduler.num_preemptions > 0
    if setting == "default":
        assert llm.core.block_manager.hits > 0  # the shared system prompt and the repeated picture
    assert_no_leaks(llm)


def test_repeated_image_is_encoded_once(tiny_ckpt):
    """A picture seen before at another place in the prompt (no prefix hit) comes from the vision cache."""
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False)
    cache = llm.core.runner.vision_cache
    llm.chat([{"role": "user", "content": [PICTURE, text("What is it?")]}], use_tqdm=False)
    assert (cache.hits, cache.misses) == (0, 1)
    llm.chat([{"role": "user", "content": [text("Look again:"), PICTURE]}], use_tqdm=False)
    assert (cache.hits, cache.misses) == (1, 1)
    assert_no_leaks(llm)


def test_abort_mid_generation_frees_blocks(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False)
    core = llm.core
    requests = [llm.prompt_request(f"count to {i}", SamplingParams(max_tokens=50, ignore_eos=True)) for i in range(4)]
    for req in requests:
        core.add(req)
    for _ in range(3):
        core.step()
    assert core.block_manager.num_free_blocks < core.block_manager.num_blocks
    for req in requests:
        core.abort(req.request_id)
    assert_no_leaks(llm)


def test_seeds(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False)
    def sample(seed, n=1):
        out = llm.generate("Tell me a story.", SamplingParams(temperature=1.0, seed=seed, max_tokens=12, n=n),
                           use_tqdm=False)
        return [o.token_ids for o in out[0].outputs]
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    two = sample(3, n=2)
    assert two == sample(3, n=2) and two[0] != two[1]
    assert_no_leaks(llm)


@pytest.mark.parametrize("prompt, params, message", [
    ("x " * 300, SamplingParams(max_tokens=1), "--max-model-len"),
    ("hello", SamplingParams(max_tokens=256), "ask for at most"),
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ([10**7], SamplingParams(), "token ids"),
])
def test_errors_before_scheduling(tiny_ckpt, prompt, params, message):
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, max_model_len=256)
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate(prompt, params, use_tqdm=False)
    assert_no_leaks(llm)


def test_too_many_images(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, limit_mm_per_prompt={"image": 1, "video": 0})
    with pytest.raises(InvalidRequestError, match="--limit-mm-per-prompt"):
        llm.chat(CONVERSATIONS[5], use_tqdm=False)
    assert_no_leaks(llm)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 50}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"min_p": 2}, "min_p"), ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_kv_sizing_is_logged(tiny_ckpt, caplog):
    caplog.set_level("INFO", logger="vlserve.engine")
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.01, max_model_len=1024)
    per_block = llm.core.runner.kv_bytes_per_block()  # 2 layers x K,V x 16 tokens x 2 heads x 16 dims x 4 bytes
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4
    blocks = int(0.01 * 2**30) // per_block
    assert llm.core.block_manager.num_blocks == blocks
    assert f"KV cache: {blocks} blocks of 16 tokens = {blocks * 16} tokens" in caplog.text
    assert f"max concurrency at max_model_len 1024: {blocks * 16 / 1024:.2f}x" in caplog.text
    override = LLM(str(tiny_ckpt), device="cpu", progress=False, num_gpu_blocks_override=7)
    assert override.core.block_manager.num_blocks == 7
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        override.generate("hello", SamplingParams(max_tokens=200), use_tqdm=False)
    assert_no_leaks(override)


@pytest.mark.parametrize("kwargs", [{"top_k": 10**40}, {"seed": 2**63}, {"min_tokens": -(2**64)},
                                    {"max_tokens": 10**30}, {"stop_token_ids": [2**64]}])
def test_integers_must_fit_64_bits(kwargs):
    """They travel to the engine core as 64-bit values: a bigger one is the client's error, not an IPC crash."""
    with pytest.raises(InvalidRequestError, match="64-bit|token ids"):
        SamplingParams(**kwargs)
