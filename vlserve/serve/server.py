"""`vlserve serve`: load the model, then listen. SIGTERM drains in-flight requests; a dead engine exits non-zero."""

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from vlserve.args import add_engine_args

if TYPE_CHECKING:
    import uvicorn

    from vlserve.serve.api import ServerState

# The server's own imports (torch, uvicorn, the engine) wait until it runs: `vlserve --help` should not pay them.

log = logging.getLogger("vlserve.serve")
ENGINE_WATCH_S = 0.5


def add_serve_args(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API (and a chat page at /ui)")
    p.add_argument("model", nargs="?", help="checkpoint folder (default: a tiny random-weight demo model)")
    p.add_argument("--model", dest="model_flag", help="the same as the positional MODEL (vLLM accepts both)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients send (default: the folder name)")
    p.add_argument("--api-key", default=os.environ.get("VLSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env VLSERVE_API_KEY)")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests that may wait beyond --max-num-seqs before new ones get 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before exiting")
    p.add_argument("--disable-ui", action="store_true", help="do not mount the chat page at /ui")
    p.add_argument("--uvicorn-log-level", default="info")
    add_engine_args(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from vlserve.args import engine_config
    from vlserve.engine.async_engine import AsyncEngine
    from vlserve.model.tiny import demo_checkpoint
    from vlserve.serve.api import ServerState, build_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = args.model_flag or args.model
    if model is None:
        model = str(demo_checkpoint())
        log.warning("no MODEL given: serving the demo checkpoint at %s; its weights are random, so its answers "
                    "are noise", model)
    config = engine_config(args, model)  # flag errors surface here, before anything loads
    engine = AsyncEngine(config)
    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    state = ServerState(engine, name, args.api_key, config.max_num_seqs + args.max_queued_requests)
    app = build_app(state)
    if not args.disable_ui:
        from vlserve.ui.app import mount_ui
        local = args.host in ("0.0.0.0", "::", "", "localhost", "127.0.0.1")  # listening on loopback too
        own_url = f"http://{'127.0.0.1' if local else args.host}:{args.port}/v1"
        mount_ui(app, api_base=own_url, api_key=args.api_key, model=name)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn handles SIGTERM/SIGINT (stop accepting, drain up to --shutdown-timeout) and then re-raises the
    # signal to the handler it found; a no-op there lets us shut the engine down and exit with our own code.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    code = asyncio.run(serve_until_done(server, state))
    engine.shutdown()
    sys.exit(code)


async def serve_until_done(server: "uvicorn.Server", state: "ServerState") -> int:
    """Runs uvicorn; if the engine dies, stops it so a supervisor restarts the process (exit code 1)."""
    async def watch_engine():
        while not server.should_exit:
            if not state.engine.is_alive:
                log.error("the engine died (%r); shutting down so a supervisor can restart", state.engine.error)
                server.should_exit = True
                return 1
            await asyncio.sleep(ENGINE_WATCH_S)
        state.draining = True
        return 0

    watcher = asyncio.create_task(watch_engine())
    await server.serve()
    state.draining = True
    if not server.started:  # e.g. the port is taken: uvicorn said why; the exit code must say it too
        watcher.cancel()
        return 1
    if not watcher.done():
        watcher.cancel()
        return 0
    return watcher.result()
