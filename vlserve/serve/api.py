"""HTTP: the OpenAI endpoints plus health, version, metrics. Every error is OpenAI's error JSON."""

import asyncio
import hmac
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlserve import __version__
from vlserve.engine.async_engine import AsyncEngine
from vlserve.errors import InvalidRequestError, VLServeError
from vlserve.serve.chat import EngineRequest, prepare_chat, prepare_completions, sampling_defaults
from vlserve.serve.errors import AuthError, ModelNotFoundError, OverloadedError, status_of
from vlserve.serve.metrics import Metrics
from vlserve.serve.protocol import (
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_json, new_id,
)
from vlserve.serve.responses import (
    TokenText, chat_response, chat_stream, collect, completion_response, completion_stream,
)

DISCONNECT_POLL_S = 0.5
GUARDED_PREFIX = "/v1"  # as vLLM: the API needs the key; health, version, metrics and docs do not
MAX_SEQUENCES_PER_REQUEST = 128  # prompts x n of one completions call, as the bound on n alone


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_name: str
    api_key: str | None
    max_pending_requests: int  # running + waiting; beyond it requests get 503 and Retry-After
    pending: int = 0
    draining: bool = False


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vlserve", version=__version__)
    engine = state.engine
    cfg, tokenizer = engine.engine.model_config, engine.engine.tokenizer
    defaults = sampling_defaults(cfg.path)
    metrics = Metrics(engine, state.served_model_name)
    token_text = TokenText(tokenizer)
    app.state.vlserve = state

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if state.api_key and request.url.path.startswith(GUARDED_PREFIX):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {state.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
                return error_response(AuthError("missing or wrong API key; send 'Authorization: Bearer <key>' "
                                                "with the key given to --api-key"))
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
            return JSONResponse(error_json(400, message, "invalid_request_error"), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return JSONResponse(error_json(400, f"{where}: {first.get('msg', 'invalid request')}{more}",
                                       "invalid_request_error", where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_json(e.status_code, str(e.detail), kind), status_code=e.status_code)

    # A VLServeError is the client's (or the load's) problem: answered here, not logged. Any other exception
    # reaches Starlette's outermost handler, which answers 500 and lets uvicorn log the traceback.
    @app.exception_handler(VLServeError)
    @app.exception_handler(Exception)
    async def any_error(_: Request, e: Exception):
        return error_response(e)

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.served_model_name, root=cfg.path,
                                         max_model_len=engine.engine.max_model_len)])

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        check_model(req.model, state)
        with admitted(state):
            prepared = await prepare_chat(req, tokenizer, cfg, engine.engine.config, defaults)
            stream = metrics.track(submit(engine, prepared))
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            if req.stream:
                return sse_response(chat_stream(stream, state.served_model_name, req.n, include_usage,
                                                token_text))
            (final,) = await until_disconnect(collect([stream]), raw)
            return chat_response(final, state.served_model_name, token_text)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model, state)
        with admitted(state):
            prepared = prepare_completions(req, tokenizer, defaults)
            if len(prepared) * req.n > MAX_SEQUENCES_PER_REQUEST:
                raise InvalidRequestError(f"{len(prepared)} prompts x n={req.n} asks for more than "
                                          f"{MAX_SEQUENCES_PER_REQUEST} sequences; split the batch")
            streams = submit_all(engine, prepared)
            streams = [metrics.track(s) for s in streams]
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            if req.stream:
                return sse_response(completion_stream(streams, state.served_model_name, req.n, include_usage,
                                                      token_text))
            finals = await until_disconnect(collect(streams), raw)
            return completion_response(finals, state.served_model_name, req.n, token_text)

    return app


def error_response(e: BaseException) -> JSONResponse:
    status, kind = status_of(e)
    message = str(e) if status != 500 else f"internal error ({type(e).__name__}: {e}); please report this bug"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(error_json(status, message, kind), status_code=status, headers=headers)


def check_model(name: str | None, state: ServerState) -> None:
    if name is not None and name != state.served_model_name:
        raise ModelNotFoundError(f"model {name!r} is not served here; this server serves "
                                 f"{state.served_model_name!r} (see /v1/models)")


@contextmanager
def admitted(s: ServerState):
    """Counts a request as pending while its handler prepares it; refuses beyond the bound."""
    if s.draining:
        raise OverloadedError("the server is shutting down; retry on another replica")
    if len(s.engine.streams) + s.pending >= s.max_pending_requests:
        raise OverloadedError(f"{s.max_pending_requests} requests are already running or waiting (the bound "
                              "is --max-num-seqs plus --max-queued-requests); retry shortly")
    s.pending += 1
    try:
        yield
    finally:
        s.pending -= 1


def submit(engine: AsyncEngine, req: EngineRequest, request_id: str | None = None):
    return engine.generate(req.prompt_token_ids, req.params, req.media, request_id=request_id)


def submit_all(engine: AsyncEngine, reqs: list[EngineRequest]):
    """All or nothing: if one prompt is refused, the ones already submitted are cancelled."""
    streams, ids = [], []
    try:
        for req in reqs:
            ids.append(new_id("cmpl"))
            streams.append(submit(engine, req, ids[-1]))
    except Exception:
        for request_id in ids[:len(streams)]:
            engine.cancel(request_id)
        raise
    return streams


async def until_disconnect(work, raw: Request):
    """Runs a non-streaming request, cancelling it (which aborts it in the engine) if the client goes away."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            raise InvalidRequestError("client disconnected")
    return task.result()


def sse_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
