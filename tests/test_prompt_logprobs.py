"""prompt_logprobs equal transformers' (fp32), scored a chunk of rows at a time, past the prefix cache; and
truncate_prompt_tokens."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from hf_reference import chat_prompt, hf_inputs, image_url, text
from vlserve import LLM, SamplingParams
from vlserve.errors import InvalidRequestError

CONVERSATIONS = [
    [{"role": "user", "content": [text("Describe the weather in three words, then count to five.")]}],
    [{"role": "user", "content": [image_url(64, 48, 1),
                                  text("What is in this picture?")]}],
]


@pytest.fixture(scope="module")
def llm(tiny_ckpt, device):
    # 8 seats: at most 7 prompt rows a step beside a sample, so every prompt is scored over several steps
    return LLM(str(tiny_ckpt), device=device, dtype="float32", max_num_seqs=8, max_model_len=1024, progress=False)


def test_prompt_logprobs_equal_transformers(tiny_ckpt, llm):
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, n=2)
    for _ in range(2):  # the second time the prompts are in the prefix cache: scored anyway
        outputs = llm.chat(CONVERSATIONS, params, use_tqdm=False)
        for conversation, out in zip(CONVERSATIONS, outputs):
            prompt = chat_prompt(llm.inputs, conversation)
            with torch.no_grad():
                ref = hf(**hf_inputs(prompt, llm.core.model_config)).logits[0].log_softmax(-1)
            ids = out.prompt_token_ids
            assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
            for j in range(1, len(ids)):
                lp = out.prompt_logprobs[j]
                assert abs(lp.logprob - ref[j - 1, ids[j]].item()) <= 1e-4, j
                assert [t for t, _ in lp.top] == ref[j - 1].topk(3).indices.tolist()
    assert llm.core.block_manager.num_free_blocks == llm.core.block_manager.num_blocks


def test_prompt_logprobs_beside_other_requests(llm):
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(["one two three four five six seven eight nine ten"] * 3, plain, use_tqdm=False)
    mixed = llm.generate(["one two three four five six seven eight nine ten"] * 3,
                         [plain, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0),
                          plain],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in mixed]
    assert [len(lp.top) for lp in mixed[1].prompt_logprobs[1:]] == [0] * (len(mixed[1].prompt_token_ids) - 1)
    assert mixed[0].prompt_logprobs is None


def test_truncate_prompt_tokens(llm):
    prompt = "one two three four five six seven eight nine ten"
    full = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
    kept = llm.generate([prompt], SamplingParams(max_tokens=1, truncate_prompt_tokens=4), use_tqdm=False)
    assert kept[0].prompt_token_ids == full[-4:]
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens 2 would drop"):
        llm.chat([CONVERSATIONS[1]], SamplingParams(truncate_prompt_tokens=2), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens must be a positive count or -1"):
        SamplingParams(truncate_prompt_tokens=0)


def test_prompt_logprobs_without_chunked_prefill_are_bounded(tiny_ckpt):
    small = LLM(str(tiny_ckpt), max_num_seqs=4, enable_chunked_prefill=False, max_model_len=256, progress=False)
    with pytest.raises(InvalidRequestError, match="needs chunked prefill"):
        small.generate(["a long enough prompt of words"], SamplingParams(prompt_logprobs=1), use_tqdm=False)
