"""Async scheduling launches step N+1 before step N's tokens reach the host. It changes when tokens are read,
never which: every sampling feature gives the same tokens and logprobs as synchronous steps, under preemption and
chunked prefill too; a stop decided a step late drops the extra token; nothing leaks; and on a GPU a decode step
never waits for the device."""

import pytest
import torch

from vlserve import LLM, SamplingParams

PROMPTS = ["Tell me a story.", "Count to ten:", "The capital of France is", "Write a haiku about rain.",
           "List three colours.", "Hello!"]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=20, logprobs=2),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_tokens=18, logprobs=1),
    SamplingParams(temperature=1.0, seed=3, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4,
                   max_tokens=24),
    SamplingParams(temperature=0, min_tokens=6, max_tokens=12, stop_token_ids=[11]),
    SamplingParams(temperature=0.7, min_p=0.1, seed=11, n=2, max_tokens=15),
    SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.3, max_tokens=20),
]
SETTINGS = {
    "default": {},
    "preemption": {"num_gpu_blocks_override": 10, "max_num_seqs": 8},
    "chunked_prefill": {"max_num_batched_tokens": 8},
}


def engine(ckpt, device, async_scheduling, **settings):
    memory = {"num_gpu_blocks_override": 1024} if device.startswith("cuda") else {}
    return LLM(str(ckpt), device=device, dtype="float32", progress=False, async_scheduling=async_scheduling,
               **(memory | settings))


def outputs(llm, prompts=PROMPTS, params=PARAMS):
    results = llm.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, o.finish_reason, o.stop_reason, [(lp.logprob, lp.top) for lp in o.logprobs or []])
            for r in results for o in r.outputs]


def assert_idle(llm):
    """Nothing left in flight once the extra step (if any) has come back, and every block free."""
    while llm.core.has_unfinished():
        llm.core.step()
    bm = llm.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.core.requests


def same(a, b):
    for (tokens_a, *rest_a, lps_a), (tokens_b, *rest_b, lps_b) in zip(a, b, strict=True):
        assert tokens_a == tokens_b and rest_a == rest_b
        for (lp_a, top_a), (lp_b, top_b) in zip(lps_a, lps_b, strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-5)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_async_equals_sync(tiny_ckpt, device, setting):
    sync = engine(tiny_ckpt, device, False, **SETTINGS[setting])
    expected = outputs(sync)
    llm = engine(tiny_ckpt, device, True, **SETTINGS[setting])
    assert (sync.core.depth, llm.core.depth) == (1, 2)
    same(outputs(llm), expected)
    if setting == "preemption":
        assert llm.core.scheduler.num_preemptions > 0 and sync.core.scheduler.num_preemptions > 0
    assert_idle(llm)


def test_stop_token_a_step_late_drops_the_extra_token(tiny_ckpt, device):
    """The step after the stop token was already launched when the stop is seen: its token never shows."""
    llm = engine(tiny_ckpt, device, True)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    free_run = llm.generate("Count to ten:", greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop = free_run[5]
    cut = free_run[:free_run.index(stop) + 1]
    steps = []
    core_step = llm.core.step
    llm.core.step = lambda: steps.append(len(llm.core.in_flight)) or core_step()
    out = llm.generate("Count to ten:", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                        stop_token_ids=[stop]), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (cut, "stop", stop)
    assert max(steps) == 1 and llm.core.has_unfinished()  # the extra step is still in flight
    assert_idle(llm)


def test_max_tokens_never_schedules_a_step_past_the_end(tiny_ckpt, device):
    """A pending token that reaches max_tokens ends the sequence whatever it is: no step is launched after it."""
    llm = engine(tiny_ckpt, device, True)
    launched = []
    submit = llm.core.runner.submit
    llm.core.runner.submit = lambda scheduled, departed: launched.append(len(scheduled)) or submit(scheduled, departed)
    out = llm.generate("Hello!", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and launched == [1] * 5  # a prefill and four decodes: no sixth step
    assert not llm.core.has_unfinished()


def test_abort_while_a_step_is_in_flight(tiny_ckpt, device):
    """The aborted samples' blocks are freed at once (the step in flight still writes them: later steps, in order
    on the same stream, overwrite them after); their tokens from that step are dropped."""
    llm = engine(tiny_ckpt, device, True)
    core = llm.core
    requests = [llm.prompt_request(f"count to {i}", SamplingParams(max_tokens=50, ignore_eos=True)) for i in range(4)]
    for req in requests:
        core.add(req)
    for _ in range(4):
        core.step()
    assert len(core.in_flight) == 1 and all(s.num_pending_tokens == 1 for s in core.scheduler.running)
    for req in requests[:2]:
        core.abort(req.request_id)
    outs = [o for _ in range(5) for o in core.step()]
    assert {o.request_id for o in outs} == {r.request_id for r in requests[2:]}  # the aborted ones never show
    for req in requests[2:]:
        core.abort(req.request_id)
    assert_idle(llm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a GPU")
def test_decode_steps_never_wait_for_the_gpu(tiny_ckpt):
    """A synchronising CUDA call on the step's path (.item(), .tolist(), a pageable copy) raises here; the one wait
    allowed is the event of the step whose tokens are read, after the next step was launched."""
    llm = engine(tiny_ckpt, "cuda", True)
    core = llm.core
    for i in range(8):
        core.add(llm.prompt_request(f"story {i}", SamplingParams(temperature=0.8, top_p=0.9, seed=i, logprobs=2,
                                                                 repetition_penalty=1.2, max_tokens=40,
                                                                 ignore_eos=True)))
    for _ in range(3):
        core.step()  # prefill, and the first pinned buffers
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            core.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_idle(llm)


def test_rounds_of_requests_never_run_out_of_seats(tiny_ckpt, device):
    """Each round ends with steps where nothing is scheduled (every sequence waits for its last token): the
    sequences that finished then free their seats with the next round's first step."""
    llm = engine(tiny_ckpt, device, True, max_num_seqs=4)
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    for i in range(8):
        results = llm.generate([f"hello {i}", f"bye {i}"], params, use_tqdm=False)
        assert [len(r.outputs[0].token_ids) for r in results] == [3, 4]
    assert len(llm.core.runner.batch.seat_of) <= 2
