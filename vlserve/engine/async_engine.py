"""The engine for servers: a background thread runs model steps; callers stream deltas with `async for`.

Only the engine thread touches the scheduler and the model. Callers talk to it through a command queue, and it
answers each request through that request's asyncio queue. If a step fails, every waiting caller gets the error
(never a hang) and the engine refuses new work.
"""

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator

from vlserve.config import EngineConfig
from vlserve.engine.llm_engine import LLMEngine
from vlserve.engine.outputs import RequestOutput
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import EngineDeadError, InvalidRequestError
from vlserve.media.item import MediaItem

log = logging.getLogger("vlserve.engine")


class AsyncEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.engine = LLMEngine(config, progress=progress)
        self.commands: queue.Queue = queue.Queue()
        self.wake = threading.Event()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.error: BaseException | None = None
        self.ids = itertools.count()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="vlserve-engine", daemon=True)
        self.thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self.thread.is_alive()

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, media: list[MediaItem] = (),
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Validates and submits the request now (raising InvalidRequestError at once, before anything is
        scheduled); the returned iterator yields one delta per step in which the request moved, the last with
        `finished=True`. Closing the iterator early (client gone, task cancelled) aborts the request and frees
        its KV blocks; a caller that never iterates must call `abort`."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped ({self.error!r}); restart the server")
        request_id = request_id or f"req-{next(self.ids)}"
        if request_id in self.streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use; ids must be unique")
        self.engine.validate(list(prompt_token_ids), params, list(media))  # pure: safe outside the engine thread
        stream: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = (asyncio.get_running_loop(), stream)
        self.send(("add", request_id, list(prompt_token_ids), params, list(media)))
        return self.deltas(request_id, stream)

    async def deltas(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.send(("abort", request_id))

    def cancel(self, request_id: str) -> None:
        """Abort a submitted request whose stream will never be read."""
        self.streams.pop(request_id, None)
        self.abort(request_id)

    def send(self, command: tuple) -> None:
        self.commands.put(command)
        self.wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)
        self.engine.shutdown()

    # ---- engine thread ----
    def run(self) -> None:
        try:
            while not self.stopping:
                self.apply_commands()
                if not self.engine.has_unfinished():
                    self.wake.wait(timeout=0.5)
                    self.wake.clear()
                    continue
                for output in self.engine.step():
                    self.deliver(output.request_id, output)
        except BaseException as e:  # noqa: BLE001 - any failure must reach every waiting caller
            log.exception("engine step failed; failing all requests")
            self.error = e
            dead = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
            for request_id in list(self.streams):
                self.deliver(request_id, dead)

    def apply_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                final = self.engine.abort(command[1])
                if final is not None:
                    self.deliver(final.request_id, final)
                continue
            _, request_id, ids, params, media = command
            if request_id not in self.streams:  # the caller left before the engine saw the request
                continue
            try:
                self.engine.add_request(ids, params, media, request_id=request_id)
            except InvalidRequestError as e:
                self.deliver(request_id, e)

    def deliver(self, request_id: str, item) -> None:
        target = self.streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
