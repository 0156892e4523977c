"""In-process server failure paths: a full queue answers 503 + Retry-After; a dead engine core turns /health 503,
fails in-flight streams with an error event, and makes the server exit non-zero."""

import asyncio
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import uvicorn

from live_server import free_port
from vlserve.config import EngineConfig
from vlserve.engine.async_engine import AsyncEngine
from vlserve.serve.api import ServerState, build_app
from vlserve.serve.lifecycle import serve_until_done

LONG = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 300, "ignore_eos": True, "stream": True}


@pytest.fixture
def state(tiny_ckpt):
    engine = AsyncEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", kv_cache_memory_gib=0.25), progress=False)
    yield ServerState(engine, "tiny", api_key=None, max_pending_requests=1)
    engine.shutdown()


def start(state):
    """Serves the app with uvicorn in this event loop (streams really stream, unlike an in-memory transport)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(serve_until_done(server, state))
    return server, serving, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)


async def started(server):
    for _ in range(200):
        if server.started:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("server did not start")


def test_full_queue_answers_503_with_retry_after(state):
    async def main():
        server, serving, c = start(state)
        await started(server)
        async with c:
            async with c.stream("POST", "/v1/chat/completions", json=LONG) as first:
                lines = first.aiter_lines()
                await lines.__anext__()
                second = await c.post("/v1/chat/completions", json={**LONG, "stream": False})
                assert second.status_code == 503 and second.headers["retry-after"] == "1"
                assert "--max-queued-requests" in second.json()["error"]["message"]
                tokenize = await c.post("/tokenize", json={"messages": LONG["messages"]})  # media work is bounded too
                assert tokenize.status_code == 503 and tokenize.headers["retry-after"] == "1"
                detokenize = await c.post("/detokenize", json={"tokens": [1, 2]})  # no media: not queued
                assert detokenize.status_code == 200
        server.should_exit = True
        assert await asyncio.wait_for(serving, timeout=30) == 0
    asyncio.run(main())


def test_dead_engine_fails_streams_health_and_exits_nonzero(state):
    async def main():
        server, serving, c = start(state)
        await started(server)
        async with c:
            async with c.stream("POST", "/v1/chat/completions", json=LONG) as r:
                lines = r.aiter_lines()
                await lines.__anext__()  # the stream is open: the core is generating
                os.kill(state.engine.core.process.pid, signal.SIGKILL)  # as the kernel's OOM killer would
                rest = [line async for line in lines]
            assert any('"code":503' in line and "exited with code -9" in line for line in rest)
            assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
            health = await c.get("/health")
            assert health.status_code == 503
            refused = await c.post("/v1/chat/completions", json={**LONG, "stream": False})
            assert refused.status_code == 503
        assert await asyncio.wait_for(serving, timeout=10) == 1
    asyncio.run(main())


def test_a_taken_port_stops_the_server_before_anything_loads(tiny_ckpt):
    """Exit status 1 (docs/multi-node.md) with the port named, without starting the engine."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "vlserve.cli", "serve", str(tiny_ckpt), "--host", "127.0.0.1",
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "vlserve.engine" not in done.stderr  # no engine log line: nothing was loaded
