"""AsyncEngine: streaming deltas, concurrency, abort (explicit and by leaving the loop), error propagation."""

import asyncio

import pytest

from vlserve import LLM, AsyncEngine, SamplingParams
from vlserve.config import EngineConfig
from vlserve.errors import EngineDeadError, InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    engine = AsyncEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", kv_cache_memory_gib=0.25), progress=False)
    yield engine
    engine.shutdown()


def tokens(engine, text):
    return engine.engine.tokenizer(text, add_special_tokens=False)["input_ids"]


async def collect(engine, ids, params, request_id=None):
    text, token_ids, finals = "", [], []
    async for delta in engine.generate(ids, params, request_id=request_id):
        (out,) = delta.outputs
        text += out.text
        token_ids += out.token_ids
        finals.append(delta.finished)
    assert finals[-1] and not any(finals[:-1])
    return text, token_ids, out.finish_reason


async def wait_idle(engine, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if not engine.engine.has_unfinished() and not engine.engine.requests:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("engine did not become idle")


def assert_blocks_free(engine):
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


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
        return await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
    results = asyncio.run(main())
    assert all(len(ids) == 12 and reason == "length" for _, ids, reason in results)
    asyncio.run(wait_idle(engine))
    assert_blocks_free(engine)


def test_leaving_the_stream_aborts_and_frees_blocks(engine):
    async def main():
        stream = engine.generate(tokens(engine, "never ending"), SamplingParams(max_tokens=200, ignore_eos=True))
        async for delta in stream:
            assert not delta.finished
            break
        await stream.aclose()  # what a disconnecting HTTP client does
        await wait_idle(engine)
    asyncio.run(main())
    assert_blocks_free(engine)


def test_explicit_abort_ends_the_stream(engine):
    async def main():
        reasons = []
        async for delta in engine.generate(tokens(engine, "stop me"), SamplingParams(max_tokens=200, ignore_eos=True),
                                           request_id="to-abort"):
            if not reasons:
                engine.abort("to-abort")
            reasons.append(delta.outputs[0].finish_reason)
        await wait_idle(engine)
        return reasons
    reasons = asyncio.run(main())
    assert reasons[-1] == "abort" and len(reasons) < 200
    assert_blocks_free(engine)


def test_duplicate_and_invalid_requests(engine):
    async def main():
        first = engine.generate(tokens(engine, "one"), GREEDY, request_id="dup")
        await first.__anext__()
        with pytest.raises(InvalidRequestError, match="already in use"):
            engine.generate(tokens(engine, "two"), GREEDY, request_id="dup")
        await first.aclose()
        with pytest.raises(InvalidRequestError, match="--max-model-len"):
            engine.generate([1] * 40000, GREEDY)
        await wait_idle(engine)
    asyncio.run(main())
    assert_blocks_free(engine)


def test_engine_failure_reaches_every_caller(tiny_ckpt):
    engine = AsyncEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", kv_cache_memory_gib=0.25), progress=False)

    def broken_step():
        raise RuntimeError("simulated CUDA error")

    async def main():
        engine.engine.step = broken_step
        callers = [collect(engine, tokens(engine, f"x{i}"), GREEDY) for i in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), timeout=10)
        assert all(isinstance(r, EngineDeadError) and "simulated CUDA error" in str(r) for r in results)
        assert not engine.is_alive
        with pytest.raises(EngineDeadError, match="restart"):
            engine.generate(tokens(engine, "later"), GREEDY)
    asyncio.run(main())
    engine.shutdown()
