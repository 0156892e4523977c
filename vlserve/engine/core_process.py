"""The engine core in its own process, and the front process's client of it.

`CoreClient(config)` starts `python -m vlserve.engine.core_process` (its own entry point: the user's __main__ is
never re-imported, and tensor-parallel workers it spawns start from it too), waits until the core has loaded the
model (or failed, whose error it raises here), then sends commands and receives step messages over ZeroMQ (ipc.py).
The core's loop only schedules, executes and samples; it exits on Shutdown, on SIGTERM, or when its parent dies.
"""

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import msgspec
import zmq

from vlserve import errors
from vlserve.config import EngineConfig
from vlserve.engine.ipc import (
    AbortRequest, Channel, Command, CoreMessage, Failed, Ready, Shutdown, Step,
)
from vlserve.engine.request import CoreOutput
from vlserve.errors import EngineDeadError

log = logging.getLogger("vlserve.engine")
POLL_MS = 200  # how often a waiting side looks at whether the other process is still there


class CoreClient:
    """The front process's end: thread-safe `send`; `recv` from one thread only."""

    def __init__(self, config: EngineConfig, progress: bool = True):
        self.folder = tempfile.mkdtemp(prefix="vlserve-core-")
        self.context = zmq.Context()
        self.lock = threading.Lock()
        self.commands = Channel(self.socket(zmq.PUSH, "commands"), Command)
        self.messages = Channel(self.socket(zmq.PULL, "messages"), CoreMessage)
        args = [sys.executable, "-m", "vlserve.engine.core_process", self.address("commands"),
                self.address("messages"), msgspec.json.encode(config).decode(), str(int(progress)),
                str(logging.getLogger().getEffectiveLevel())]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        try:
            ready = self.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.capacity, self.stats = ready.capacity, ready.stats

    def address(self, name: str) -> str:
        return f"ipc://{self.folder}/{name}"

    def socket(self, kind: int, name: str) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.bind(self.address(name))
        return socket

    def wait_ready(self) -> Ready:
        while True:
            message = self.messages.recv(POLL_MS)
            if isinstance(message, Failed):
                self.process.wait(timeout=30)
                raise core_error(message)
            if isinstance(message, Ready):
                return message
            if self.process.poll() is not None:
                raise EngineDeadError(f"the engine core process exited with code {self.process.returncode} while "
                                      "starting; its log above says why")

    @property
    def is_alive(self) -> bool:
        return self.process.poll() is None

    def send(self, command) -> None:
        with self.lock:
            self.commands.send(command)

    def recv(self, timeout_ms: int = POLL_MS):
        return self.messages.recv(timeout_ms)

    def shutdown(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            try:
                self.send(Shutdown())
                self.process.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, EngineDeadError, zmq.ZMQError):
                self.process.kill()
                self.process.wait()
        self.context.destroy(linger=0)
        shutil.rmtree(self.folder, ignore_errors=True)


def core_error(failed: Failed) -> Exception:
    """The core's failure as the vlserve error it was (a ConfigError stays one), else as EngineDeadError."""
    kind = getattr(errors, failed.kind, None)
    if isinstance(kind, type) and issubclass(kind, errors.VLServeError):
        return kind(failed.message)
    return EngineDeadError(f"the engine failed: {failed.kind}: {failed.message}")


# ---- the core process ----
def main(commands_address: str, messages_address: str, config_json: str, progress: str, log_level: str) -> int:
    logging.basicConfig(level=int(log_level), format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front drains, then stops us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parent = os.getppid()
    exit_with_parent()
    context = zmq.Context()
    commands = Channel(connect(context, zmq.PULL, commands_address), Command)
    messages = Channel(connect(context, zmq.PUSH, messages_address), CoreMessage)
    core = None
    try:
        from vlserve.engine.core import EngineCore  # torch and the model: after the sockets, so failures are told

        core = EngineCore(msgspec.json.decode(config_json, type=EngineConfig), progress=progress == "1")
        messages.send(Ready(core.capacity, core.stats()))
        run(core, commands, messages, parent)
        return 0
    except BaseException as e:  # noqa: BLE001 - whatever stops the core must reach the front
        if isinstance(e, SystemExit) and not e.code:
            return 0
        if not isinstance(e, errors.VLServeError):
            log.exception("the engine core failed")
        messages.send(Failed(type(e).__name__, str(e)))
        return 1
    finally:
        if core is not None:
            core.shutdown()
        context.destroy(linger=1000)  # let a Failed message out


def run(core, commands: Channel, messages: Channel, parent: int) -> None:
    """The busy loop: apply every waiting command, take one step if there is work, report."""
    while True:
        refused, changed, timeout = [], False, 0 if core.has_unfinished() else POLL_MS
        while (command := commands.recv(timeout)) is not None:
            if isinstance(command, Shutdown):
                return
            refused += apply(core, command)
            changed, timeout = True, 0
        if os.getppid() != parent:
            log.error("the front process is gone; the engine core stops")
            return
        if core.has_unfinished():
            messages.send(Step(refused + core.step(), core.stats()))
        elif changed:
            messages.send(Step(refused, core.stats()))


def apply(core, command) -> list[CoreOutput]:
    """Applies one command; returns the final outputs of a request the core could not take (none normally)."""
    if isinstance(command, AbortRequest):
        core.abort(command.request_id, command.index)
        return []
    try:
        core.add(command.request)
    except Exception as e:  # a front bug, not a dead engine: end that request, keep serving
        log.error("refused request %s: %s", command.request.request_id, e)
        return [CoreOutput(command.request.request_id, i, [], finish_reason="abort")
                for i in range(command.request.params.n)]
    return []


def connect(context: zmq.Context, kind: int, address: str) -> zmq.Socket:
    socket = context.socket(kind)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(address)
    return socket


def exit_with_parent() -> None:
    """Linux: SIGTERM when the front process dies, even by SIGKILL (elsewhere the loop's parent check does it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
