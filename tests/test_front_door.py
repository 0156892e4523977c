"""The front door under ordinary and hostile client behaviour, against a real `vlserve serve` (engine core in its
own process): /health stays fast under huge prompts, clients that give up free everything, requests built to
exhaust memory are refused from their headers, and each client-facing limit (body size, media options that may
only tighten, local files, stop strings, header timeout, drain) says what to change."""

import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from live_server import live_server, metric, raw_post, wait_all_blocks_free
from media_samples import make_video_bytes, solid_colours
from vlserve.engine.sampling_params import MAX_STOP_STRINGS

MAX_MODEL_LEN = 4096


def png_url(width: int, height: int, colour=(200, 30, 90)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue())
                                               .decode()}}


def chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the engine core, its workers), in MiB."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def descendants(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found += [int(entry), *descendants(int(entry))]
    return found


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    os.mkfifo(root / "pipe.png")
    (root / "escape.png").symlink_to("/etc/hostname")
    return root


@pytest.fixture(scope="module")
def server(tiny_ckpt, media_root):
    flags = ["--max-model-len", str(MAX_MODEL_LEN), "--disable-ui", "--max-request-body-mib", "4",
             "--header-timeout", "1", "--allowed-local-media-path", str(media_root)]
    with live_server(tiny_ckpt, *flags) as (base, proc):
        yield base, proc


def post(base: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)


def test_health_stays_fast_while_50_clients_send_300k_word_prompts(server):
    base, _ = server
    body = json.dumps(chat("word " * 300_000)).encode()  # 1.5 MB each, far over --max-model-len

    latencies = []
    with httpx.Client(base_url=base, timeout=10) as probe, ThreadPoolExecutor(50) as pool:
        senders = [pool.submit(raw_post, base, "/v1/chat/completions", body) for _ in range(50)]
        while len(latencies) < 5 or not all(f.done() for f in senders):
            start = time.perf_counter()
            assert probe.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
        answers = [f.result() for f in senders]
    print(f"/health: {len(latencies)} probes, median {statistics.median(latencies) * 1e3:.1f} ms, "
          f"max {max(latencies) * 1e3:.1f} ms")
    assert all(status == 400 and "--max-model-len" in reply["error"]["message"] for status, reply in answers)
    # A blocked event loop answers in seconds; a free one in tens of ms even on a loaded 2-core CI machine (there
    # the median was seen at 54 ms: the bound leaves room for load, not for a frozen loop).
    assert statistics.median(latencies) < 0.25 and max(latencies) < 1.0, (statistics.median(latencies),
                                                                           max(latencies))


def test_clients_that_give_up_free_everything_within_2_s(server):
    """100 non-streaming clients leave after 0.5 s: their requests are aborted (the disconnect is seen without
    BaseHTTPMiddleware), nothing runs or waits 2 s later, every block is free, and a new request is answered."""
    base, _ = server
    aborted = metric(base, "request_aborts")
    body = chat("Tell a long story.", max_tokens=3000, ignore_eos=True)

    async def main():
        # They give up while waiting for the answer: connecting and sending are not what they give up on (on a
        # loaded 2-core machine a 0.5 s connect could time out, and a request the server never saw is no abort).
        timeout = httpx.Timeout(30.0, read=0.5)
        async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=httpx.Limits(max_connections=110)) as c:
            async def client():
                with pytest.raises(httpx.ReadTimeout):
                    await c.post("/v1/chat/completions", json=body)
            await asyncio.gather(*(client() for _ in range(100)))
    asyncio.run(main())
    gave_up = time.monotonic()
    wait_all_blocks_free(base, timeout=2.0)
    assert time.monotonic() - gave_up < 2.0
    assert metric(base, "request_aborts") >= aborted + 100
    r = post(base, chat("hello"), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("name, content, extra, message", [
    ("upscale 1x1 to 3e8 pixels", [png_url(1, 1)], {"mm_processor_kwargs": {"min_pixels": 3e8, "max_pixels": 3e8}},
     "is over the server's"),
    ("five 3584x3584 images", [png_url(3584, 3584) for _ in range(5)], {}, "--max-model-len"),
    ("ten-minute video, every frame", [{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64," + base64.b64encode(make_video_bytes(
            56, 56, 600, 1.0, paint=solid_colours([(0, 0, 0), (255, 255, 255)]))).decode()}}],
     {"mm_processor_kwargs": {"max_frames": 100000, "fps": 30}}, "is over the server's"),
    ("ten-minute video within the options", [{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64," + base64.b64encode(make_video_bytes(
            448, 448, 600, 1.0, paint=solid_colours([(0, 0, 0), (255, 255, 255)]))).decode()}}], {},
     "--max-model-len"),
    ("17 images, the 17th broken", [png_url(28, 28)] * 16 + [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgoAAAAN"}}], {}, "over the limit of 16"),
])
def test_memory_bombs_are_refused_from_their_headers(server, name, content, extra, message):
    base, proc = server
    before = rss_mib(proc.pid)
    r = post(base, chat(content, **extra))
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert rss_mib(proc.pid) - before < 100
    assert httpx.get(f"{base}/health").status_code == 200


def test_request_body_limit(server):
    base, _ = server
    r = post(base, chat("x" * (5 << 20)))
    assert r.status_code == 413 and "--max-request-body-mib" in r.json()["error"]["message"]


def test_local_media_must_be_a_regular_file_and_paths_stay_private(server, media_root):
    base, _ = server
    start = time.monotonic()
    fifo = post(base, chat([{"type": "image_url", "image_url": {"url": "pipe.png"}}]), timeout=20)
    assert fifo.status_code == 400 and "regular file" in fifo.json()["error"]["message"]
    assert time.monotonic() - start < 10  # never opened blocking
    for url in ("escape.png", "../../etc/passwd", f"file://{media_root}/missing.png"):
        r = post(base, chat([{"type": "image_url", "image_url": {"url": url}}]))
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "--allowed-local-media-path" in message or "cannot read" in message
        assert "/etc/hostname" not in message and (url.startswith("file://") or str(media_root) not in message)


def test_stop_strings_are_capped(server):
    base, _ = server
    r = post(base, chat("hi", stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]))
    assert r.status_code == 400 and f"at most {MAX_STOP_STRINGS} strings" in r.json()["error"]["message"]


def test_bearer_scheme_is_case_insensitive(tiny_ckpt):
    with live_server(tiny_ckpt, "--disable-ui", api_key="sk-case") as (base, _):
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"{scheme} sk-case"})
            assert r.status_code == 200, scheme
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Basic sk-case"}).status_code == 401


def test_idle_connections_are_closed_after_the_header_timeout(server):
    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x")  # a head that never ends
        start = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 6


def test_streams_open_at_the_end_of_the_drain_end_with_an_error_event(tiny_ckpt):
    with live_server(tiny_ckpt, "--disable-ui", "--shutdown-timeout", "3") as (base, proc):
        body = chat("count", max_tokens=20_000, ignore_eos=True, stream=True)
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            for _ in range(100):  # until the server has seen the signal (a request before that is still served)
                refused = post(base, chat("new", max_tokens=1), timeout=10)
                if refused.status_code == 503:
                    break
            rest = [line for line in lines if line]
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert '"code":503' in rest[-2] and "--shutdown-timeout" in rest[-2] and rest[-1] == "data: [DONE]"
        assert proc.wait(timeout=30) == 0
