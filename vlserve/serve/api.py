"""HTTP: the OpenAI endpoints plus health, version, metrics. Every error is OpenAI's error JSON.

A request's path: the handler admits it (bounded queue), the input processor makes it an EngineRequest in the
engine's thread pool, the engine core runs it in its own process, the output processor's deltas come back here
and become chunks or, built in the pool too, one response. The event loop only moves bytes, so /health answers
at once whatever the requests cost. A client that goes away (streaming or not) aborts its request.
"""

import asyncio
import logging
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlserve import __version__
from vlserve.engine.async_engine import AsyncEngine
from vlserve.errors import InvalidRequestError, VLServeError
from vlserve.serve.errors import ModelNotFoundError, OverloadedError, status_of
from vlserve.serve.metrics import Metrics
from vlserve.serve.middleware import MIB, ApiKeyMiddleware, BodyLimitMiddleware
from vlserve.serve.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
    TokenizeRequest, TokenizeResponse, error_json, ignored_fields, new_id,
)
from vlserve.engine.sampling_params import SamplingParams
from vlserve.serve.responses import (
    TokenText, chat_response, chat_stream, collect, completion_response, completion_stream,
)
from vlserve.serve.sampling import sampling_defaults, sampling_params
from vlserve.serve.tools import ToolMode, template_tools, tool_grammar, tool_mode

log = logging.getLogger("vlserve.serve")
DISCONNECT_POLL_S = 0.5
MAX_SEQUENCES_PER_REQUEST = 128  # prompts x n of one completions call, as the bound on n alone


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_name: str
    api_key: str | None
    max_pending_requests: int  # running + waiting; beyond it requests get 503 and Retry-After
    max_request_body_mib: float = 32.0
    metrics_prefix: str = "vlserve"  # vllm: the families under vLLM's names, for its dashboards
    auto_tools: bool = False  # --enable-auto-tool-choice (with --tool-call-parser hermes): tool_choice "auto"
    log_requests: bool = True  # --disable-log-requests: no line per request
    pending: int = 0
    draining: bool = False


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vlserve", version=__version__)
    engine = state.engine
    defaults = sampling_defaults(engine.config.model)
    metrics = Metrics(engine, state.served_model_name, state.metrics_prefix)

    def tracked(request):
        """The engine's delta stream for `request`, observed by the metrics (and holding the request alone)."""
        return metrics.track(engine.generate(request), request.params.n, request.max_tokens)
    app.state.vlserve = state
    # Pure ASGI middlewares (under Starlette's BaseHTTPMiddleware a disconnect was never seen); the key is
    # checked before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(state.max_request_body_mib * MIB))
    app.add_middleware(ApiKeyMiddleware, api_key=state.api_key)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError):
        errors = e.errors()
        # of a union's alternatives (content: a string or a list of parts), the one that got furthest says most
        first = max(errors, key=lambda err: len(err.get("loc", ()))) if errors else {}
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

    @app.api_route("/ping", methods=["GET", "POST"])  # vLLM's (SageMaker's) liveness probe: /health's answer
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
        random = engine.config.load_format == "dummy" or engine.model_config.random_weights
        return ModelList(data=[ModelCard(id=state.served_model_name, root=engine.config.model,
                                         max_model_len=engine.capacity.max_model_len, random_weights=random)])

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
    async def chat(raw: Request):
        req = await parsed(engine, raw, ChatCompletionRequest)
        check_model(req.model, state)
        mode = tool_mode(req.tools, req.tool_choice, state.auto_tools)
        with admitted(state):
            # no local name keeps the request (and its pixels) alive in this frame while it runs
            stream = tracked(await engine.process(chat_request, engine, req, defaults, mode))
            token_text = TokenText(engine.tokenizer, req.return_tokens_as_token_ids)
            if req.stream:
                return sse_response(chat_stream(stream, state.served_model_name, req.n, req.stream_options,
                                                token_text, mode))
            (final,) = await until_disconnect(collect([stream]), raw)
            body = await engine.process(lambda: chat_response(final, state.served_model_name, token_text,
                                                              mode).model_dump_json())
            return Response(body, media_type="application/json")

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(raw: Request):
        req = await parsed(engine, raw, CompletionRequest)
        check_model(req.model, state)
        with admitted(state):
            requests, echoes = await engine.process(completion_requests, engine, req, defaults)
            streams = [tracked(r) for r in requests]
            del requests  # the streams hold them while they run, and no longer
            token_text = TokenText(engine.tokenizer, req.return_tokens_as_token_ids)
            if req.stream:
                return sse_response(completion_stream(streams, state.served_model_name, req.n, req.stream_options,
                                                      token_text, echoes))
            finals = await until_disconnect(collect(streams), raw)
            body = await engine.process(lambda: completion_response(finals, state.served_model_name, req.n,
                                                                    token_text, echoes, req).model_dump_json())
            return Response(body, media_type="application/json")

    @app.post("/tokenize", openapi_extra=json_body(TokenizeRequest))
    async def tokenize(raw: Request):
        req = await parsed(engine, raw, TokenizeRequest)
        check_model(req.model, state)
        with admitted(state):  # media are fetched and decoded as for a chat: under the same bound
            body = await engine.process(lambda: tokenized(engine, req).model_dump_json())
        return Response(body, media_type="application/json")

    @app.post("/detokenize", openapi_extra=json_body(DetokenizeRequest))
    async def detokenize(raw: Request):
        req = await parsed(engine, raw, DetokenizeRequest)
        check_model(req.model, state)
        body = await engine.process(lambda: detokenized(engine, req).model_dump_json())
        return Response(body, media_type="application/json")

    app.openapi = lambda: openapi_with_bodies(app, (ChatCompletionRequest, CompletionRequest, TokenizeRequest,
                                                    DetokenizeRequest))
    return app


async def parsed(engine: AsyncEngine, raw: Request, model: type[BaseModel]):
    """The body as `model`, parsed and validated in the engine's thread pool: a 30 MB body must not hold the event
    loop (FastAPI would parse it there). Errors become FastAPI's own 400s."""
    body = await raw.body()
    try:
        request = await engine.process(model.model_validate_json, body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    ignored = ignored_fields(request)
    if ignored and raw.app.state.vlserve.log_requests:
        log.info("%s %s: ignored fields it does not use: %s", raw.method, raw.url.path, ", ".join(ignored[:20]))
    return request


def json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of an endpoint that parses `model` itself (see `parsed`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def openapi_with_bodies(app: FastAPI, models) -> dict:
    """FastAPI's schema plus the request models that `json_body` refers to (clients and fuzzers read them)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema


def chat_request(engine: AsyncEngine, req: ChatCompletionRequest, defaults: dict, mode: ToolMode):
    """The input processor's EngineRequest for a chat request (runs in the engine's thread pool)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true")
    forced, asked = tool_grammar(req.tools, mode, req.parallel_tool_calls), req.structured()
    if forced and asked:
        raise InvalidRequestError(f"tool_choice {mode.choice!r} already makes the output a call; drop "
                                  "response_format and guided_* (or use tool_choice auto or none)")
    params = sampling_params(req, defaults, req.max_completion_tokens or req.max_tokens,
                             (req.top_logprobs or 0) if req.logprobs else None, forced or asked)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    return engine.inputs.chat(new_id("chatcmpl"), messages, params, req.mm_processor_kwargs,
                              req.rendering(template_tools(req.tools)))


def tokenized(engine: AsyncEngine, req: TokenizeRequest) -> TokenizeResponse:
    """The prompt a chat or completions request with these fields would run, through the same input processor
    (a prompt over --max-model-len is refused as it would be there). Runs in the engine's thread pool."""
    params = SamplingParams(max_tokens=1)
    if req.prompt is not None:
        ids = engine.inputs.prompt(new_id("tok"), req.prompt, params).prompt_token_ids
    else:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        ids = engine.inputs.chat(new_id("tok"), messages, params, req.mm_processor_kwargs,
                                 req.rendering(template_tools(req.tools))).prompt_token_ids
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.capacity.max_model_len, tokens=ids, token_strs=strs)


def detokenized(engine: AsyncEngine, req: DetokenizeRequest) -> DetokenizeResponse:
    """Runs in the engine's thread pool: a body of millions of ids must not hold the event loop."""
    vocab = len(engine.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"tokens {bad[:5]} are not ids of this model's vocabulary (0 to {vocab - 1})")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens))


def completion_requests(engine: AsyncEngine, req: CompletionRequest, defaults: dict):
    """One EngineRequest per prompt (OpenAI allows a batch of prompts in one call), all checked before any runs;
    and per prompt the text its choices start with (the prompt's, with `echo`)."""
    echo_scores = req.echo and req.logprobs is not None  # the prompt's tokens get logprobs like the output's
    params = sampling_params(req, defaults, req.max_tokens, req.logprobs, req.structured(),
                             max(req.prompt_logprobs or 0, req.logprobs) if echo_scores else None)
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise InvalidRequestError("prompt is empty; send a string, a list of token ids, or a list of those")
    if len(prompts) * req.n > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidRequestError(f"{len(prompts)} prompts x n={req.n} asks for more than "
                                  f"{MAX_SEQUENCES_PER_REQUEST} sequences; split the batch")
    requests = [engine.inputs.prompt(new_id("cmpl"), prompt, params) for prompt in prompts]
    echoes = [engine.tokenizer.decode(r.prompt_token_ids) if req.echo else "" for r in requests]
    return requests, echoes


def error_response(e: BaseException) -> JSONResponse:
    status, kind = status_of(e)
    message = str(e) if status != 500 else f"internal error ({type(e).__name__}: {e}); please report this bug"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(error_json(status, message, kind), status_code=status, headers=headers)


def check_model(name: str | None, state: ServerState) -> None:
    """Absent or empty (as vLLM takes it): the served model."""
    if name and name != state.served_model_name:
        raise ModelNotFoundError(f"model {name!r} is not served here; this server serves "
                                 f"{state.served_model_name!r} (see /v1/models)")


@contextmanager
def admitted(s: ServerState):
    """Counts a request as pending while its handler prepares it; refuses beyond the bound."""
    if s.draining:
        raise OverloadedError("the server is shutting down; retry on another replica")
    if s.engine.num_unfinished + s.pending >= s.max_pending_requests:
        raise OverloadedError(f"{s.max_pending_requests} requests are already running or waiting (the bound "
                              "is --max-num-seqs plus --max-queued-requests); retry shortly")
    s.pending += 1
    try:
        yield
    finally:
        s.pending -= 1


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
