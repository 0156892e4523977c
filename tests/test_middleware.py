"""The API key and body limit middlewares and the header-timeout protocol, against real uvicorn servers on
127.0.0.1. Servers run in the test's event loop, so the tests speak raw HTTP through asyncio streams (a
blocking socket would stall the server) and every wait is bounded and waits on a state, not a sleep."""

import asyncio
import contextlib
import hashlib
import logging
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlserve.distributed.executor import free_port
from vlserve.serve.http_protocol import protocol_class
from vlserve.serve.middleware import AUTH_MESSAGE, ApiKeyMiddleware, BodyLimitMiddleware, bearer_token
from vlserve.serve.protocol import error_json

KEY = "s3cret-key"
LIMIT = 1024
WAIT_S = 5.0  # generous bound on anything that should take milliseconds


@contextlib.asynccontextmanager
async def serving(app, **config):
    """Serves `app` with uvicorn in this event loop; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning",
                                           lifespan="off", **config))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(WAIT_S):
            while not server.started:
                assert not task.done(), "uvicorn exited before it started"
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT_S)


async def read_response(reader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, headers, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT_S)
    return int(status_line.split()[1]), headers, body


async def closed_after(reader) -> float:
    """Seconds until the server closes the connection (reading whatever else it sends); fails after WAIT_S."""
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        rest = await asyncio.wait_for(reader.read(), WAIT_S)
        assert rest == b"", f"the server sent more after the response: {rest[:200]!r}"
    return time.monotonic() - t0


def error_app(raw_body_seen: list) -> FastAPI:
    """A FastAPI app like vlserve's: handlers for Exception and HTTPException, a JSON-model and a raw endpoint."""
    app = FastAPI()

    class Item(BaseModel):
        text: str

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception):
        return JSONResponse(error_json(500, f"internal error ({e!r})", "internal_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_json(e.status_code, str(e.detail), "invalid_request_error"),
                            status_code=e.status_code)

    @app.post("/v1/item")
    async def item(it: Item):
        return {"len": len(it.text)}

    @app.post("/v1/raw")
    async def raw(request: Request):
        body = await request.body()
        raw_body_seen.append(body)
        return {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    @app.get("/health")
    async def health():
        return {"ok": True}

    return app


# --- API key ---------------------------------------------------------------------------------------------------

def test_api_key_scheme_any_case_wrong_or_missing_key_401_and_unguarded_paths():
    async def main():
        async with serving(ApiKeyMiddleware(error_app([]), KEY)) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as c:
                for scheme in ("Bearer", "bearer", "BEARER"):
                    r = await c.post("/v1/item", json={"text": "hi"}, headers={"Authorization": f"{scheme} {KEY}"})
                    assert r.status_code == 200 and r.json() == {"len": 2}, (scheme, r.text)
                r = await c.post("/v1/item", json={"text": "hi"}, headers={"Authorization": f"Bearer \t  {KEY}"})
                assert r.status_code == 200, r.text
                for auth in (None, f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", "Bearer", KEY, ""):
                    r = await c.post("/v1/item", json={"text": "hi"},
                                     headers={} if auth is None else {"Authorization": auth})
                    assert r.status_code == 401, (auth, r.text)
                    assert r.json() == error_json(401, AUTH_MESSAGE, "authentication_error")
                    assert r.json()["error"]["type"] == "authentication_error" and "--api-key" in r.text
                r = await c.get("/health")
                assert r.status_code == 200 and r.json() == {"ok": True}
        async with serving(ApiKeyMiddleware(error_app([]), None)) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as c:
                r = await c.post("/v1/item", json={"text": "hi"})
                assert r.status_code == 200, r.text
    asyncio.run(main())


def test_bearer_token_parsing():  # HTTP parsers strip the whitespace around a header value; this is the fallback
    assert bearer_token(b"  bEaReR \t k3y  ") == b"k3y"
    for bad in (None, b"", b"Bearer", b"Bearer  ", b"Basic k3y", b"k3y", b"Bearerk3y"):
        assert bearer_token(bad) is None, bad


def test_endpoint_sees_client_disconnect_through_the_middlewares():
    """The regression test for BaseHTTPMiddleware, under which is_disconnected() never turned True."""
    entered, finished = asyncio.Event(), asyncio.Event()
    seen = {}
    app = FastAPI()

    @app.get("/v1/wait")
    async def wait(request: Request):
        entered.set()
        seen["disconnected"] = False
        for _ in range(int(WAIT_S / 0.02)):
            if await request.is_disconnected():
                seen["disconnected"] = True
                break
            await asyncio.sleep(0.02)
        finished.set()
        return {"done": True}

    async def main():
        async with serving(ApiKeyMiddleware(BodyLimitMiddleware(app, LIMIT), KEY)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /v1/wait HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
            await writer.drain()
            await asyncio.wait_for(entered.wait(), WAIT_S)
            writer.close()
            await asyncio.wait_for(finished.wait(), 2 * WAIT_S)
            assert seen["disconnected"] is True
    asyncio.run(main())


# --- body limit ------------------------------------------------------------------------------------------------

def wrap(app, placement: str):
    """The body limit outside the whole app, or inside it (within Starlette's ServerErrorMiddleware)."""
    if placement == "outside":
        return BodyLimitMiddleware(app, LIMIT)
    app.add_middleware(BodyLimitMiddleware, max_bytes=LIMIT)
    return app


def assert_413(status: int, headers: dict, body: bytes):
    assert status == 413, body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = httpx.Response(413, content=body).json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 413
    assert "over the limit of 1024 bytes" in error["message"] and "--max-request-body-mib" in error["message"]


@pytest.fixture
def uvicorn_errors(caplog):
    """Errors uvicorn logs (e.g. 'Exception in ASGI application', a second response start): there must be none."""
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_content_length_over_limit_413_at_once_without_the_app_reading_the_body(placement, uvicorn_errors):
    seen = []

    async def main():
        async with serving(wrap(error_app(seen), placement)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/raw HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000000\r\n\r\n{\"te")  # claims 100 MB, sends 5 bytes
            await writer.drain()
            assert_413(*await read_response(reader))
            assert await closed_after(reader) < WAIT_S
            writer.close()
    asyncio.run(main())
    assert seen == [] and uvicorn_errors() == []


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_a_client_that_sends_a_whole_oversized_body_reads_its_413(placement, uvicorn_errors):
    """The server reads the refused body before it closes: a close with unread data resets the connection, and the
    reset could reach the client before the 413 (a test once failed so, 1 run in 20)."""
    body = b"x" * (2 << 20)

    async def main():
        async with serving(wrap(error_app([]), placement)) as port:
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/raw HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
                assert_413(*await read_response(reader))
                writer.close()
    asyncio.run(main())
    assert uvicorn_errors() == []


@pytest.mark.parametrize("placement", ["outside", "inside"])
@pytest.mark.parametrize("path", ["/v1/raw", "/v1/item"])
def test_chunked_body_over_limit_413_exactly_once(placement, path, uvicorn_errors):
    """Past the limit mid-read: one 413, even though FastAPI turns a failed body read into a 400 and the app
    has an Exception handler that would answer 500."""
    seen = []

    async def main():
        async with serving(wrap(error_app(seen), placement)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            chunk = b"%x\r\n%s\r\n" % (512, b"a" * 512)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode() + chunk * 3)  # 1536 bytes, no last chunk
            await writer.drain()
            assert_413(*await read_response(reader))
            assert await closed_after(reader) < WAIT_S  # no second response, and the connection is closed
            writer.close()
    asyncio.run(main())
    assert seen == [] and uvicorn_errors() == []


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_body_under_limit_reaches_app_intact(placement, uvicorn_errors):
    seen = []
    body = bytes(range(256)) * 4  # exactly LIMIT

    async def chunks():
        for i in range(0, len(body), 100):
            yield body[i:i + 100]

    async def main():
        async with serving(wrap(error_app(seen), placement)) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as c:
                expect = {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
                r = await c.post("/v1/raw", content=body, headers={"Content-Type": "application/octet-stream"})
                assert r.status_code == 200 and r.json() == expect, r.text
                r = await c.post("/v1/raw", content=chunks())  # chunked: no Content-Length
                assert r.status_code == 200 and r.json() == expect, r.text
                r = await c.post("/v1/item", json={"text": "x" * 100})
                assert r.status_code == 200 and r.json() == {"len": 100}, r.text
                r = await c.post("/v1/raw", content=body + b"!")
                assert r.status_code == 413 and r.json()["error"]["code"] == 413
    asyncio.run(main())
    assert seen == [body, body] and uvicorn_errors() == []


# --- header timeout --------------------------------------------------------------------------------------------

TIMEOUT_S = 0.5


def timeout_app():
    app = FastAPI()

    @app.get("/")
    async def root():
        return {"ok": True}
    return app


def test_silent_connection_closed_at_header_deadline():
    async def main():
        async with serving(timeout_app(), http=protocol_class(TIMEOUT_S)) as port:
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await closed_after(reader)
            assert TIMEOUT_S * 0.8 <= time.monotonic() - t0 < WAIT_S
            writer.close()
    asyncio.run(main())


def test_trickled_headers_do_not_extend_the_deadline():
    async def main():
        async with serving(timeout_app(), http=protocol_class(TIMEOUT_S)) as port:
            head = b"GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: slowloris-" + b"x" * 40 + b"\r\n\r\n"  # > 6 s trickled
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.monotonic()

            async def trickle():
                with contextlib.suppress(ConnectionError):
                    for i in range(len(head)):
                        writer.write(head[i:i + 1])
                        await writer.drain()
                        await asyncio.sleep(0.1)

            sender = asyncio.create_task(trickle())
            await closed_after(reader)
            elapsed = time.monotonic() - t0
            assert not sender.done() and TIMEOUT_S * 0.8 <= elapsed < WAIT_S, elapsed
            sender.cancel()
            writer.close()
    asyncio.run(main())


def test_keep_alive_requests_work_and_idle_keep_alive_closes_at_deadline():
    async def main():
        # uvicorn's own keep-alive timer (restarted by any byte) is set far off: only the header deadline may close
        async with serving(timeout_app(), http=protocol_class(TIMEOUT_S), timeout_keep_alive=60) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):
                for part in (b"GET / HTTP/1.1\r\n", b"Host: t\r\n", b"\r\n"):  # a head in parts, within the deadline
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(TIMEOUT_S / 10)
                status, headers, body = await read_response(reader)
                assert status == 200 and body == b'{"ok":true}' and headers.get("connection") != "close"
            t0 = time.monotonic()
            await closed_after(reader)  # idle after the last response: closed at the deadline
            assert time.monotonic() - t0 < WAIT_S
            writer.close()
    asyncio.run(main())
