"""Pure ASGI middlewares: the API key check and the request body limit.

Pure ASGI (not Starlette's BaseHTTPMiddleware, whose receive never reports a disconnect, so
`Request.is_disconnected()` stayed False and abandoned requests kept generating). Both pass non-http scopes
(lifespan, websocket) through untouched, and pass the app the server's own `receive` wherever they can.

Contracts:
- ApiKeyMiddleware: with a key configured, an http request whose path (less --root-path) starts with one of `guarded` needs
  `Authorization: Bearer <key>` (scheme case-insensitive, whitespace around tolerated, the key compared in
  constant time); otherwise 401 with OpenAI's error JSON and the app is not called.
- BodyLimitMiddleware: a request body over `max_bytes` gets 413 with OpenAI's error JSON, exactly one
  response per request. A Content-Length over the limit is answered before the app runs and before any body is
  read. A body without one (chunked) is counted as the app reads it; the moment the count passes the limit the
  app's receive says `http.disconnect` from then on, and, unless the app had already started its response,
  the 413 goes out and whatever the app sends or raises afterwards is dropped. The 413 says `Connection: close`, so the
  server does not read the rest of the body.

Why the 413 is sent from inside the wrapped receive rather than by raising and catching an exception: FastAPI
turns any exception raised while it reads the body into HTTPException(400) (fastapi/routing.py), and an
`@app.exception_handler(Exception)` answers through ServerErrorMiddleware before an outer middleware could
see the exception; either way a raised signal would come back as a 400 or 500, not a 413.
"""

import hmac
import logging

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_S = 10.0  # how long a refused body is read before the 413
DRAIN_IDLE_S = 0.5  # ... unless it stops coming for this long

from vlserve.serve.protocol import error_json

log = logging.getLogger("vlserve.serve")

MIB = 1 << 20
AUTH_MESSAGE = "missing or wrong API key; send 'Authorization: Bearer <key>' with the key given to --api-key"


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def bearer_token(value: bytes | None) -> bytes | None:
    """The token of 'Bearer <token>' (scheme in any case, whitespace around tolerated), or None."""
    parts = (value or b"").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    return parts[1].strip()


GUARDED = ("/v1", "/tokenize", "/detokenize")  # what the key guards: everything that runs the model or its inputs


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, guarded: tuple[str, ...] = GUARDED):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or not route_path(scope).startswith(self.guarded):
            return await self.app(scope, receive, send)
        token = bearer_token(header(scope, b"authorization"))
        if token is not None and hmac.compare_digest(token, self.key):  # constant time
            return await self.app(scope, receive, send)
        response = JSONResponse(error_json(401, AUTH_MESSAGE, "authentication_error"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path the app routes: without --root-path's prefix, whether the proxy in front stripped it or not."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def size_text(n: int) -> str:
    return f"{n // MIB} MiB" if n and n % MIB == 0 else f"{n} bytes"


def content_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:  # the HTTP server rejects these before the app; be safe anyway
        return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the request body limit must be >= 0 bytes, not {max_bytes}; "
                             "fix --max-request-body-mib")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = content_length(scope)
        if length is not None and length > self.max_bytes:
            await drain(receive)
            return await self.too_large(send)
        guard = _Guard(self, receive, send)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.answered:
                raise
            # The app failed for want of the body we cut off after answering 413: nothing left to tell anyone.
            log.debug("app raised after its request body went over the limit", exc_info=True)

    async def too_large(self, send: Send) -> None:
        message = (f"the request body is over the limit of {size_text(self.max_bytes)} (--max-request-body-mib); "
                   "send smaller media or raise --max-request-body-mib")
        response = JSONResponse(error_json(413, message, "invalid_request_error"), status_code=413,
                                headers={"Connection": "close"})
        with anyio.CancelScope(shield=True):  # receive may run under Request.is_disconnected's cancelled scope
            await response({"type": "http"}, _no_receive, send)


async def drain(receive: Receive) -> None:
    """Reads (and drops) the rest of a refused body while it keeps coming, for up to DRAIN_S: closing a connection
    whose data is unread makes the kernel reset it, and the reset can reach the client before it has read the 413
    (nginx lingers for the same reason). Costs time, never memory."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(DRAIN_S):  # shielded: see too_large
        while True:
            with anyio.move_on_after(DRAIN_IDLE_S) as idle:  # a client that claims more than it sends
                message = await receive()
            if idle.cancelled_caught or message["type"] != "http.request" or not message.get("more_body"):
                return


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class _Guard:
    """One request's body count and response state, between the app and the server."""

    def __init__(self, limit: BodyLimitMiddleware, receive: Receive, send: Send):
        self.limit, self.inner_receive, self.inner_send = limit, receive, send
        self.received = 0
        self.started = False  # the response (the app's or our 413) has begun
        self.tripped = False  # the body went over the limit: the app gets no more of it
        self.answered = False  # ... and we answered 413, so the app is no longer heard

    async def receive(self) -> Message:
        if self.tripped:
            return {"type": "http.disconnect"}
        message = await self.inner_receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.max_bytes:
                self.tripped = True
                if not self.started:
                    self.started = self.answered = True
                    if message.get("more_body"):
                        await drain(self.inner_receive)
                    await self.limit.too_large(self.inner_send)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.answered:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self.inner_send(message)
