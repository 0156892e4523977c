"""A rank of the `mp` executor as its own process: `python -m vlserve.distributed.worker_process`, its arguments
pickled on standard input. Unlike multiprocessing's spawn it never re-imports the user's `__main__`, so scripts
fed on standard input, scripts without an `if __name__ == "__main__"` guard and notebooks can start ranks.

The parent forwards the worker's standard error line by line to its own and keeps the last lines, which name the
cause when the worker exits (see SpawnedWorker.exitcode). A worker whose parent dies exits too.
"""

import collections
import os
import pickle
import subprocess
import sys
import threading

TAIL_LINES = 12


class SpawnedWorker:
    """One rank's process, with the liveness interface of multiprocessing.Process that MultiprocRunner uses."""

    def __init__(self, rank: int, args: tuple):
        self.name = f"vlserve-rank{rank}"
        self.tail = collections.deque(maxlen=TAIL_LINES)
        # The parent's import path (as multiprocessing's spawn passes it): vlserve and whatever the user's script
        # put on sys.path import the same way in the rank.
        path = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"})
        self.pid = self.proc.pid
        self.forwarder = threading.Thread(target=self._forward, name=f"{self.name}-stderr", daemon=True)
        self.forwarder.start()
        try:
            self.proc.stdin.write(pickle.dumps((rank, *args)))
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died before reading: exitcode says why

    def _forward(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.tail.append(line.rstrip())
            sys.stderr.write(line)

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exitcode(self) -> str:
        code = self.proc.poll()
        self.forwarder.join(timeout=2)  # the last lines it wrote
        last = " | ".join(line for line in list(self.tail)[-3:] if line.strip())
        return f"{code}{'; last lines: ' + last if last else ''}"

    def join(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.proc.kill()


def exit_with_parent(parent: int) -> None:
    """Rank 0's process is gone (killed, crashed): nothing will ever send this rank a step."""
    while os.getppid() == parent:
        threading.Event().wait(1.0)
    os._exit(1)


def main() -> None:
    args = pickle.loads(sys.stdin.buffer.read())
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    from vlserve.distributed.executor import worker_main  # after the pickle: a bad payload fails fast

    worker_main(*args)


if __name__ == "__main__":
    main()
