"""A real `vlserve serve` subprocess on a free 127.0.0.1 port, for tests that talk HTTP to it."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from vlserve.distributed.executor import free_port

START_TIMEOUT_S = 90


@contextlib.contextmanager
def live_server(model, *flags: str, api_key: str | None = None):
    """Yields (base_url, process); the process is always stopped afterwards. `process.output()` is what it printed
    so far."""
    port = free_port()
    cmd = [sys.executable, "-m", "vlserve.cli", "serve", str(model), "--port", str(port),
           "--kv-cache-memory-gib", "0.25", "--uvicorn-log-level", "warning", *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on its output
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    proc.output = lambda: (log.seek(0), log.read())[1]
    try:
        wait_healthy(base, proc, log)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_healthy(base: str, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"vlserve serve exited with {proc.returncode}:\n{log.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"vlserve serve did not become healthy within {START_TIMEOUT_S} s")


def metric(base: str, name: str) -> float:
    """One unlabelled-or-single-series value from /metrics."""
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"vlserve:{name}"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_all_blocks_free(base: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(base, "kv_cache_free_blocks") == metric(base, "kv_cache_total_blocks")
                and metric(base, "num_requests_running") == 0 and metric(base, "num_requests_waiting") == 0):
            return
        time.sleep(0.1)
    raise AssertionError(f"KV blocks still in use after {timeout} s: "
                         f"{metric(base, 'kv_cache_free_blocks')} of {metric(base, 'kv_cache_total_blocks')} free")


def raw_post(base: str, path: str, body: bytes) -> tuple[int, dict]:
    """One HTTP/1.1 POST over a plain socket: the whole request leaves in one sendall (C code, no GIL held), so
    50 of these in threads load the server, not this process."""
    host, port = base.removeprefix("http://").split(":")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=120) as s:
        s.sendall(head + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)
