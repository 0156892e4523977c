"""CUDA graphs for decode: bucket choice, padding and 1-D decode positions on the CPU; on a GPU, the engine with
graphs gives the tokens of the eager engine (fp32: all of them; bf16: the first 16 on most prompts)."""

import pytest
import torch

from vlserve import LLM, SamplingParams
from vlserve.args import add_engine_args, engine_config
from vlserve.engine.cuda_graphs import bucket, capture_sizes, pad_decode
from vlserve.model.layers.attention import AttentionMetadata
from vlserve.model.layers.rotary import MRotaryEmbedding

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
PROMPTS = ["Hi!", "Name three prime numbers.", "Count to ten, slowly.", "Tell me about the sea. " * 5,
           "Why is the sky blue?", "Write a haiku.", "List four fruits and their colours.", "A"]


def test_capture_sizes_end_at_max_num_seqs():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert capture_sizes(1000) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]


def test_bucket_is_the_smallest_size_that_holds_the_batch():
    sizes = capture_sizes(100)
    assert [bucket(sizes, b) for b in (1, 2, 3, 5, 8, 9, 64, 65, 100)] == [1, 2, 4, 8, 8, 16, 64, 100, 100]
    assert bucket(sizes, 101) is None


def test_padding_rows_write_to_the_spare_block_only():
    meta = AttentionMetadata.from_lengths([1, 1, 1], [5, 17, 2], [[3], [4, 7], [9]], [52, 112, 145])
    ids, positions = torch.tensor([11, 12, 13]), torch.tensor([4, 20, 1])
    padded = pad_decode(ids, positions, meta, 5, spare_block=30, block_size=16)
    assert padded.input_ids.tolist() == [11, 12, 13, 0, 0]
    assert padded.positions.tolist() == [4, 20, 1, 0, 0]
    assert padded.slot_mapping.tolist() == [52, 112, 145, 480, 480]
    assert padded.context_lens.tolist() == [5, 17, 2, 1, 1]
    assert padded.block_tables.tolist() == [[3, 0], [4, 7], [9, 0], [30, 0], [30, 0]]
    assert padded.context_lens.dtype == padded.block_tables.dtype == torch.int32


def test_one_row_positions_rotate_as_three_equal_rows():
    rotary = MRotaryEmbedding(64, 1e6, (8, 12, 12))
    positions = torch.tensor([0, 7, 300, 32767])
    q, k = torch.randn(4, 4, 64), torch.randn(4, 2, 64)
    one = rotary(positions, q, k)
    three = rotary(positions.expand(3, -1), q, k)
    assert all(torch.equal(a, b) for a, b in zip(one, three))


def test_decode_steps_get_one_row_positions(tiny_ckpt):
    """A decode step of a picture prompt: `pos + rope_delta` in one row; its prefill keeps the three rows."""
    from hf_reference import image_url, text
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False)
    runner, shapes = llm.core.runner, []
    prepare = runner.prepare

    def record(scheduled, departed=()):
        step, seqs = prepare(scheduled, departed)
        shapes.append((tuple(step.positions.shape), step.is_decode, scheduled[0].seq.rope_delta))
        return step, seqs

    runner.prepare = record
    llm.chat([{"role": "user", "content": [image_url(112, 84, 3), text("What is it?")]}],
             SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    (prefill_shape, prefill_decode, delta), *decodes = shapes
    assert prefill_shape[0] == 3 and not prefill_decode and delta != 0
    assert [(shape, decode) for shape, decode, _ in decodes] == [((1,), True)] * 2


def test_enforce_eager_flag():
    import argparse
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config(p.parse_args(["--enforce-eager"]), "m").enforce_eager
    assert not engine_config(p.parse_args([]), "m").enforce_eager


def generate(ckpt, dtype: str, enforce_eager: bool, prompts: list[str], max_tokens: int) -> tuple[list, bool]:
    """Greedy tokens per prompt, and whether the engine captured graphs. A fixed KV size skips memory profiling,
    which would count the previous engine's memory while the process still holds it."""
    llm = LLM(str(ckpt), device="cuda", dtype=dtype, num_gpu_blocks_override=128, max_num_seqs=16,
              enforce_eager=enforce_eager, progress=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outputs], llm.core.runner.graphs is not None


@requires_cuda
@pytest.mark.parametrize("batch", [3, 5])  # padded to graphs of 4 and 8
def test_graphs_equal_eager_fp32(tiny_ckpt, batch, monkeypatch):
    eager, captured = generate(tiny_ckpt, "float32", True, PROMPTS[:batch], 24)
    assert not captured
    replays = []
    from vlserve.engine.cuda_graphs import DecodeGraphs
    replay = DecodeGraphs.replay
    monkeypatch.setattr(DecodeGraphs, "replay", lambda self, ids, *a: replays.append(len(ids)) or replay(self, ids, *a))
    graphs, captured = generate(tiny_ckpt, "float32", False, PROMPTS[:batch], 24)
    assert captured and graphs == eager
    assert batch in replays and len(replays) >= 20  # every decode step of the whole batch replayed a graph


@requires_cuda
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "tiny_awq", "tiny_gptq"])
def test_graphs_equal_eager_for_each_family(request, family):
    """Qwen2-VL's and Qwen3-VL's language models (q/k norm, interleaved M-RoPE) and the int4 kernels in graphs."""
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    eager, _ = generate(ckpt, "float32", True, PROMPTS[:3], 16)
    graphs, captured = generate(ckpt, "float32", False, PROMPTS[:3], 16)
    assert captured and graphs == eager


@requires_cuda
def test_graphs_agree_with_eager_bf16(tiny_ckpt):
    eager, _ = generate(tiny_ckpt, "bfloat16", True, PROMPTS, 16)
    graphs, _ = generate(tiny_ckpt, "bfloat16", False, PROMPTS, 16)
    agree = sum(g == e for g, e in zip(graphs, eager))
    assert agree >= len(PROMPTS) * 3 // 4, (graphs, eager)


def expected_positions(scheduled) -> torch.Tensor:
    """Token by token: a multimodal prompt's own M-RoPE column, else `i + rope_delta` on all three rows."""
    columns = []
    for item in scheduled:
        seq = item.seq
        for i in range(item.start, item.end):
            if seq.mrope_positions is not None and i < seq.num_prompt_tokens:
                columns.append(seq.mrope_positions[:, i])
            else:
                columns.append(torch.full((3,), i + seq.rope_delta))
    return torch.stack(columns, dim=1)


def test_step_positions_over_chunks_of_mixed_batches(tiny_ckpt):
    """Chunked prefill cuts a picture prompt mid-way; text prompts and decodes share its steps: every step's
    positions equal the token-by-token form (one row when the step only decodes)."""
    from hf_reference import image_url, text
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, max_num_batched_tokens=16, enable_prefix_caching=False)
    runner, checked = llm.core.runner, []
    prepare = runner.prepare

    def check(scheduled, departed=()):
        step, seqs = prepare(scheduled, departed)
        expected = expected_positions(scheduled)
        assert torch.equal(step.positions, expected[0] if step.is_decode else expected)
        picture_chunk = any(s.seq.mrope_positions is not None and s.start < s.seq.num_prompt_tokens
                            for s in scheduled)
        checked.append((step.is_decode, picture_chunk))
        return step, seqs

    runner.prepare = check
    llm.chat([[{"role": "user", "content": [image_url(112, 84, 3), text("What is it?")]}],
              [{"role": "user", "content": "a text prompt beside it"}]],
             SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert sum(mm for _, mm in checked) >= 3  # the picture prompt took three chunks, its last beside a text one
    assert any(decode for decode, _ in checked) and not all(decode for decode, _ in checked)
