"""`vlserve serve`: load the model, then listen (serve/lifecycle.py: the drain on SIGTERM, exit codes)."""

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from vlserve.args import add_engine_args, api_key_from_env
from vlserve.errors import ConfigError

# The server's own imports (torch, uvicorn, the engine) wait until it runs: `vlserve --help` should not pay them.

log = logging.getLogger("vlserve.serve")
TOOL_CALL_PARSERS = ("hermes",)  # serve/tools.py: Qwen2.5's <tool_call> blocks


def add_serve_args(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API (and a chat page at /ui)")
    p.add_argument("model", nargs="?", help="checkpoint folder (default: a tiny random-weight demo model)")
    p.add_argument("--model", dest="model_flag", help="the same as the positional MODEL (vLLM accepts both)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--served-model-name", help="the model name clients send (default: the folder name)")
    p.add_argument("--api-key", default=api_key_from_env(),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: env VLSERVE_API_KEY, else VLLM_API_KEY)")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests that may wait beyond --max-num-seqs before new ones get 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before ending them with an error")
    p.add_argument("--max-request-body-mib", type=float, default=32.0,
                   help="largest request body accepted, in MiB (images and videos sent inline count); larger get 413")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed")
    p.add_argument("--disable-ui", action="store_true", help="do not mount the chat page at /ui")
    p.add_argument("--metrics-prefix", choices=("vlserve", "vllm"), default="vlserve",
                   help="the prefix of /metrics' families: vllm names them as vLLM does, for its Grafana dashboards")
    p.add_argument("--root-path", default="", help="the path prefix a reverse proxy serves vlserve under (e.g. /llm), "
                   "for the API's own links")
    p.add_argument("--uvicorn-log-level", default="info", help="uvicorn's log level (the access log is at info)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide when to call tools (tool_choice "auto", the default when a request '
                   "sends tools); needs --tool-call-parser")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                   help="how tool calls are read from the model's text: hermes (<tool_call> blocks, Qwen2.5's)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no log line per request (vlserve logs only the fields a request sent that it ignores)")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="accepted for vLLM command lines: vlserve logs no periodic statistics (see /metrics)")
    add_engine_args(p)
    p.set_defaults(func=run_serve)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (uvicorn listens on it): taken before the engine starts, so a port in use is
    found in a second, not after the weights have loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def served_name(model: str) -> str:
    """A Hugging Face name as given (clients copied it from vLLM: "Qwen/Qwen2.5-VL-7B-Instruct"), else the
    folder's name."""
    from vlserve.config import is_hub_name

    return model if is_hub_name(model) else os.path.basename(os.path.normpath(model))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vlserve.args import engine_config
    from vlserve.engine.async_engine import AsyncEngine
    from vlserve.model.tiny import demo_checkpoint
    from vlserve.serve.api import ServerState, build_app
    from vlserve.serve.http_protocol import protocol_class
    from vlserve.serve.lifecycle import FLUSH_S, DrainingServer, serve_until_done

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = args.model_flag or args.model
    if model is None:
        model = str(demo_checkpoint())
        log.warning("no MODEL given: serving the demo checkpoint at %s; its weights are random, so its answers "
                    "are noise", model)
    config = engine_config(args, model)  # flag errors surface here, before anything loads
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (hermes for Qwen2.5 models)")
    try:
        sock = listen_socket(args.host, args.port)  # a taken port, too, before anything loads
    except OSError as e:
        print(f"vlserve serve: error: cannot listen on {args.host}:{args.port}: {e.strerror}; stop what holds the "
              "port or choose another with --port", file=sys.stderr)
        return 1
    engine = AsyncEngine(config)
    name = args.served_model_name or served_name(model)
    state = ServerState(engine, name, args.api_key, engine.config.max_num_seqs + args.max_queued_requests,
                        args.max_request_body_mib, args.metrics_prefix, args.enable_auto_tool_choice,
                        not args.disable_log_requests)
    app = build_app(state)
    local = args.host in ("0.0.0.0", "::", "", "localhost", "127.0.0.1")  # listening on loopback too
    root = f"http://{'127.0.0.1' if local else args.host}:{args.port}"
    if not args.disable_ui:
        from vlserve.ui.app import mount_ui
        mount_ui(app, api_base=f"{root}/v1", api_key=args.api_key, model=name)
    log.info("serving %r: OpenAI API at %s/v1%s", name, root, "" if args.disable_ui else f", chat page at {root}/ui")
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                           root_path=args.root_path,
                                           timeout_graceful_shutdown=FLUSH_S,
                                           http=protocol_class(args.header_timeout)))
    # uvicorn re-raises a signal it handled to the handler it found; a no-op there lets us shut the engine down
    # and exit with our own code.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    code = asyncio.run(serve_until_done(server, state, args.shutdown_timeout, sock))
    engine.shutdown()
    sys.exit(code)
