"""The engine for servers, in the front process: input processor (a thread pool), engine core (its own process),
output processor (a receiver thread). Callers stream deltas with `async for`.

    request = await engine.process(engine.inputs.chat, request_id, messages, params)  # off the event loop
    async for delta in engine.generate(request): ...

The event loop never tokenizes, decodes media or runs the model; it only hands work over. The receiver thread
reads the core's step messages, turns them into text (output processor) and answers each request through its
asyncio queue. If the core fails or its process dies, every waiting caller gets EngineDeadError (never a hang)
and the engine refuses new work.
"""

import asyncio
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from vlserve.config import EngineConfig, ModelConfig
from vlserve.engine.core_process import CoreClient, core_error
from vlserve.engine.ipc import AbortRequest, AddRequest, Failed, Step
from vlserve.engine.output_processor import OutputProcessor
from vlserve.engine.outputs import RequestOutput
from vlserve.engine.request import EngineRequest
from vlserve.errors import EngineDeadError, InvalidRequestError
from vlserve.inputs import InputProcessor
from vlserve.media.template import load_tokenizer
from vlserve.model.hub import fetched
from vlserve.plan.preflight import settle

log = logging.getLogger("vlserve.engine")


class AsyncEngine:
    def __init__(self, config: EngineConfig, progress: bool = True, input_workers: int | None = None):
        self.config = config = settle(fetched(config))  # a model name found; knobs left unset, as the plan has them
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer_dir, config.chat_template)
        self.core = CoreClient(config, progress)
        self.capacity, self.stats = self.core.capacity, self.core.stats
        self.inputs = InputProcessor(config, self.model_config, self.tokenizer, self.capacity)
        self.outputs = OutputProcessor(self.tokenizer)
        self.pool = ThreadPoolExecutor(input_workers or os.cpu_count() or 1, thread_name_prefix="vlserve-input")
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.lock = threading.Lock()  # the output processor and streams: the loop's thread and the receiver's
        self.error: BaseException | None = None
        self.num_aborted = 0  # requests ended before finishing (client gone, cancelled)
        self.stopping = False
        self.receiver = threading.Thread(target=self.receive, name="vlserve-outputs", daemon=True)
        self.receiver.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self.core.is_alive

    @property
    def num_unfinished(self) -> int:
        return len(self.streams)

    async def process(self, fn, *args, **kwargs):
        """Runs `fn` (an input processor method, a response builder) in the thread pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submits a request the input processor made; the iterator yields one delta per step in which it moved,
        the last with `finished=True`. Closing the iterator early (client gone, task cancelled) aborts the request
        and frees its KV blocks."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped ({self.error!r}); restart the server")
        stream: asyncio.Queue = asyncio.Queue()
        with self.lock:
            if request.request_id in self.streams:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use; ids must be unique")
            self.streams[request.request_id] = (asyncio.get_running_loop(), stream)
            self.outputs.add(request)
        try:
            self.core.send(AddRequest(request))
        except BaseException:
            with self.lock:  # never sent: nothing of it may stay behind
                self.streams.pop(request.request_id, None)
                self.outputs.abort(request.request_id)
            raise
        return self.deltas(request.request_id, stream)

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
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends the request (its stream, if still read, gets a last delta with finish_reason "abort") and frees
        its KV blocks in the core."""
        with self.lock:
            target = self.streams.pop(request_id, None)
            final = self.outputs.abort(request_id)
        if final is None:
            return
        self.num_aborted += 1
        if target is not None:
            put(*target, final)
        self.tell_core(AbortRequest(request_id))

    def end_all(self, error: BaseException) -> int:
        """Ends every open request with `error` (a stream sends it as its last event) and aborts it in the core:
        the server's last act when its drain time runs out. Returns how many were open."""
        with self.lock:
            targets = list(self.streams.items())
            self.streams.clear()
            for request_id, _ in targets:
                self.outputs.abort(request_id)
        for request_id, (loop, stream) in targets:
            self.num_aborted += 1
            put(loop, stream, error)
            self.tell_core(AbortRequest(request_id))
        return len(targets)

    def tell_core(self, command) -> None:
        """A command whose loss does not matter once the core is gone (aborts: a dead core frees everything)."""
        if self.is_alive:
            try:
                self.core.send(command)
            except EngineDeadError:
                pass

    def shutdown(self) -> None:
        self.stopping = True
        self.receiver.join(timeout=5)
        self.core.shutdown()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- receiver thread ----
    def receive(self) -> None:
        try:
            while not self.stopping:
                message = self.core.recv()
                if isinstance(message, Step):
                    self.stats = message.stats
                    self.deliver_step(message)
                elif isinstance(message, Failed):
                    raise core_error(message)
                elif message is None and not self.core.is_alive and not self.stopping:
                    raise EngineDeadError(f"the engine core process exited with code {self.core.process.returncode};"
                                          " restart the server")
        except BaseException as e:  # noqa: BLE001 - any failure must reach every waiting caller
            self.fail(e)

    def deliver_step(self, step: Step) -> None:
        with self.lock:
            processed = self.outputs.process(step.outputs)
            targets = [(self.streams.get(out.request_id), out) for out in processed.outputs]
            for out in processed.outputs:
                if out.finished:
                    self.streams.pop(out.request_id, None)
        for target, out in targets:
            if target is not None:
                put(*target, out)
        for request_id, index in processed.aborts:
            self.tell_core(AbortRequest(request_id, index))

    def fail(self, e: BaseException) -> None:
        log.error("the engine failed; failing all requests: %s", e)
        self.error = e
        dead = e if isinstance(e, EngineDeadError) else EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
        with self.lock:
            targets = list(self.streams.values())
            self.streams.clear()
        for loop, stream in targets:
            put(loop, stream, dead)


def put(loop: asyncio.AbstractEventLoop, stream: asyncio.Queue, item) -> None:
    """Hands `item` to a caller's queue from the receiver thread (a caller whose loop has ended is gone)."""
    try:
        loop.call_soon_threadsafe(stream.put_nowait, item)
    except RuntimeError:
        pass
