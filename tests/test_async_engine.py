"""AsyncEngine (input processor, engine core process, output processor): streaming deltas, concurrency, abort
(explicit and by leaving the loop), stop strings ending one sample, error propagation from the core process."""

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys

import pytest

from vlserve import LLM, AsyncEngine, SamplingParams
from vlserve.config import EngineConfig
from vlserve.errors import ConfigError, EngineDeadError, InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
IDS = itertools.count()


def config(ckpt, **kwargs):
    return EngineConfig(model=str(ckpt), device="cpu", kv_cache_memory_gib=0.25, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    engine = AsyncEngine(config(tiny_ckpt), progress=False)
    yield engine
    engine.shutdown()


def tokens(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def submit(engine, prompt, params, request_id=None):
    return engine.generate(engine.inputs.prompt(request_id or f"t-{next(IDS)}", prompt, params))


async def collect(engine, prompt, params, request_id=None):
    text, token_ids, finals = "", [], []
    async for delta in submit(engine, prompt, params, request_id):
        (out,) = delta.outputs
        text += out.text
        token_ids += out.token_ids
        finals.append(delta.finished)
    assert finals[-1] and not any(finals[:-1])
    return text, token_ids, out.finish_reason


async def wait_idle(engine, timeout=20.0):
    """Until the core reports nothing running or waiting and every KV block free (its counters come with each
    step message and after each command)."""
    for _ in range(int(timeout / 0.02)):
        s = engine.stats
        if not engine.num_unfinished and not s.num_running and not s.num_waiting and s.free_blocks == s.total_blocks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not become idle: {engine.stats}")


def test_streamed_deltas_equal_offline_output(engine, tiny_ckpt):
    ids = tokens(engine, "The quick brown fox 狐狸 🦊")
    text, token_ids, reason = asyncio.run(collect(engine, ids, GREEDY))
    offline = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.25).generate(
        {"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0].outputs[0]
    assert (text, token_ids, reason) == (offline.text, offline.token_ids, "length")
    assert "\ufffd" not in text


def test_many_concurrent_requests(engine):
    async def main():
        prompts = [tokens(engine, f"Request number {i} says hello") for i in range(20)]
        results = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
        await wait_idle(engine)
        return results
    results = asyncio.run(main())
    assert all(len(ids) == 12 and reason == "length" for _, ids, reason in results)


def test_leaving_the_stream_aborts_and_frees_blocks(engine):
    async def main():
        stream = submit(engine, "never ending", SamplingParams(max_tokens=200, ignore_eos=True))
        async for delta in stream:
            assert not delta.finished
            break
        await stream.aclose()  # what a disconnecting HTTP client does
        await wait_idle(engine)
    aborted = engine.num_aborted
    asyncio.run(main())
    assert engine.num_aborted == aborted + 1


def test_explicit_abort_ends_the_stream(engine):
    async def main():
        reasons = []
        async for delta in submit(engine, "stop me", SamplingParams(max_tokens=200, ignore_eos=True), "to-abort"):
            if not reasons:
                engine.abort("to-abort")
            reasons.append(delta.outputs[0].finish_reason)
        await wait_idle(engine)
        return reasons
    reasons = asyncio.run(main())
    assert reasons[-1] == "abort" and len(reasons) < 200


def test_stop_string_ends_only_its_sample(engine, tiny_ckpt):
    """The output processor finds stop strings: it ends that sample and aborts it in the core, while the other
    samples of the request go on; the texts equal the offline engine's."""
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, seed=1)
    _, ids, _ = asyncio.run(collect(engine, "tell me", greedy))
    stop = engine.tokenizer.decode(ids[5:7])  # a stop string the greedy output reaches after a few tokens
    params = SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True, seed=1, n=3, stop=[stop])
    offline = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.25).generate(
        "tell me", params, use_tqdm=False)[0]

    async def main():
        final = None
        async for delta in submit(engine, "tell me", params):
            final = delta if final is None else final
            if final is not delta:
                final.add(delta)
        await wait_idle(engine)
        return final
    got = asyncio.run(main())
    assert [(o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in got.outputs] == \
        [(o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in offline.outputs]
    greedy_stop = asyncio.run(collect(engine, "tell me", SamplingParams(temperature=0, max_tokens=30,
                                                                         ignore_eos=True, stop=[stop])))
    assert greedy_stop[2] == "stop" and not greedy_stop[0].endswith(stop)


def test_duplicate_and_invalid_requests(engine):
    async def main():
        first = submit(engine, "one", GREEDY, "dup")
        await first.__anext__()
        with pytest.raises(InvalidRequestError, match="already in use"):
            submit(engine, "two", GREEDY, "dup")
        await first.aclose()
        with pytest.raises(InvalidRequestError, match="--max-model-len"):
            submit(engine, [1] * 40000, GREEDY)
        await wait_idle(engine)
    asyncio.run(main())


def test_core_start_failure_is_raised_in_the_front(tiny_ckpt):
    """A mistake found in the core process (here the planner's, before any weight is read) comes back as the
    same error, and the core process is gone."""
    with pytest.raises(ConfigError, match="--tensor-parallel-size 3"):
        AsyncEngine(config(tiny_ckpt, tensor_parallel_size=3), progress=False)


def test_core_death_reaches_every_caller(tiny_ckpt):
    engine = AsyncEngine(config(tiny_ckpt), progress=False)

    async def main():
        long = SamplingParams(max_tokens=500, ignore_eos=True)
        callers = [asyncio.ensure_future(collect(engine, f"x{i}", long)) for i in range(3)]
        for _ in range(3000):  # until all three run in the core (bounded: 30 s)
            if engine.stats.num_running == 3:
                break
            await asyncio.sleep(0.01)
        assert engine.stats.num_running == 3, engine.stats
        os.kill(engine.core.process.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), timeout=10)
        assert all(isinstance(r, EngineDeadError) and "exited with code -9" in str(r) for r in results), results
        assert not engine.is_alive
        with pytest.raises(EngineDeadError, match="restart"):
            submit(engine, "later", GREEDY)
    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


FRONT = """
import asyncio, json, sys
import torch
from vlserve import AsyncEngine, SamplingParams
from vlserve.config import EngineConfig

async def main(engine):
    request = engine.inputs.prompt("r", "The quick brown fox", SamplingParams(temperature=0, max_tokens=8,
                                                                             ignore_eos=True))
    return [t for delta in [d async for d in engine.generate(request)] for t in delta.outputs[0].token_ids]

config = EngineConfig(**json.loads(sys.argv[1]))
engine = AsyncEngine(config, progress=False)
tokens = asyncio.run(main(engine))
engine.shutdown()
print(json.dumps({"tokens": tokens, "device": engine.capacity.device, "front_cuda": torch.cuda.is_initialized()}))
"""


def test_core_runs_on_the_device_and_the_front_never_touches_it(tiny_ckpt, device):
    """The engine core process owns the device (CUDA is initialised there, never in the front, which may then
    fork or spawn freely); its greedy tokens equal the offline engine's on the same device."""
    memory = {"num_gpu_blocks_override": 1024} if device.startswith("cuda") else {"kv_cache_memory_gib": 0.25}
    args = {"model": str(tiny_ckpt), "device": device, "dtype": "float32", **memory}
    out = subprocess.run([sys.executable, "-c", FRONT, json.dumps(args)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"].startswith(device) and result["front_cuda"] is False
    offline = LLM(progress=False, **args).generate("The quick brown fox", SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert result["tokens"] == offline
