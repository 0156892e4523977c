"""A running server's life: serving until a drain ends or the engine dies, and the exit code that says which.

The drain: on SIGTERM (or Ctrl-C) new requests get 503 while running ones go on for up to --shutdown-timeout
seconds; any still open then end with an error (a stream's last event, then [DONE]; a non-streaming request its
503), and uvicorn closes the connections once those last bytes are out (FLUSH_S at most). A second signal stops
at once. When the engine dies, open requests get their error and the server answers 503 for DEATH_GRACE_S before
it exits. Exit codes: 0 after a drain, 1 when the engine died (so a supervisor restarts) or the server could not
start (the port taken).
"""

import asyncio
import logging
import socket
import time

import uvicorn

from vlserve.serve.api import ServerState
from vlserve.serve.errors import OverloadedError

log = logging.getLogger("vlserve.serve")
WATCH_S = 0.1  # how often the server looks at its engine and its drain
FLUSH_S = 5.0  # after the drain: time the last events have to reach the clients
DEATH_GRACE_S = 1.0  # after the engine died and every request has its error: /health says 503 this long


async def last_words(engine) -> None:
    """Before a dead engine's server exits: every open request gets its error (streams their last event), and
    /health and new requests answer 503 for a moment, so clients and load balancers see why the server goes."""
    deadline = time.monotonic() + FLUSH_S
    while engine.num_unfinished and time.monotonic() < deadline:
        await asyncio.sleep(WATCH_S)
    await asyncio.sleep(DEATH_GRACE_S)


class DrainingServer(uvicorn.Server):
    """A first SIGTERM/SIGINT asks for a drain (serve_until_done runs it); a second one stops at once."""
    drain_requested = False

    def handle_exit(self, sig, frame) -> None:
        if self.drain_requested:
            super().handle_exit(sig, frame)
        self.drain_requested = True


async def serve_until_done(server: uvicorn.Server, state: ServerState, drain_timeout: float = 30.0,
                           sock: socket.socket | None = None) -> int:
    """Runs uvicorn until a drain ends or the engine dies; the exit code: 0, or 1 when the engine died (so a
    supervisor restarts the process) or the server could not start (e.g. the port is taken)."""
    async def watch() -> int:
        deadline = None
        while not server.should_exit:
            engine = state.engine
            if not engine.is_alive:
                log.error("the engine died (%r); shutting down so a supervisor can restart", engine.error)
                state.draining = True
                await last_words(engine)
                server.should_exit = True
                return 1
            if getattr(server, "drain_requested", False) and deadline is None:
                state.draining, deadline = True, time.monotonic() + drain_timeout
                log.info("draining: %d requests in flight, up to %.0f s (--shutdown-timeout)",
                         engine.num_unfinished, drain_timeout)
            if deadline is not None and (engine.num_unfinished == 0 or time.monotonic() >= deadline):
                ended = engine.end_all(OverloadedError(
                    f"the server shut down before this request finished (--shutdown-timeout {drain_timeout:g} s); "
                    "retry it"))
                if ended:
                    log.warning("drain time over: %d requests ended with an error", ended)
                server.should_exit = True
                return 0
            await asyncio.sleep(WATCH_S)
        state.draining = True
        return 0

    watcher = asyncio.create_task(watch())
    await server.serve(sockets=[sock] if sock is not None else None)
    state.draining = True
    if not server.started:  # e.g. the port is taken: uvicorn said why; the exit code must say it too
        watcher.cancel()
        return 1
    if not watcher.done():
        watcher.cancel()
        return 0
    return watcher.result()
