"""The chat page: history -> OpenAI messages, error lines, Stop closing the HTTP stream, and a real browser
driving the page that a live `vlserve serve` mounts at /ui."""

import asyncio
import base64
import contextlib
import json
import os
import re
import time

import gradio as gr
import openai
import pytest
from live_server import free_port, live_server, metric

from vlserve.ui.chat_page import (
    Backend,
    Turn,
    chat_view,
    error_text,
    media_part,
    to_messages,
)

IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
VIDEO_PART = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,BBBB"}}


# ---- history -> messages ----
def test_messages_keep_raw_text_and_media_of_every_turn():
    turns = [Turn("what is **this**?", ["a.png"], [IMAGE_PART], answer="A <b>red</b> square\n\n| a |"),
             Turn("and these?", ["b.mp4", "c.png"], [VIDEO_PART, IMAGE_PART])]
    assert to_messages("", turns) == [
        {"role": "user", "content": [IMAGE_PART, {"type": "text", "text": "what is **this**?"}]},
        {"role": "assistant", "content": "A <b>red</b> square\n\n| a |"},  # raw, not Gradio's rendered HTML
        {"role": "user", "content": [VIDEO_PART, IMAGE_PART, {"type": "text", "text": "and these?"}]},
    ]


def test_text_only_turns_are_plain_strings_and_system_prompt_leads():
    messages = to_messages("Be brief.", [Turn("hi", answer="hello"), Turn("bye")])
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    assert to_messages("  \n", [Turn("hi")]) == [{"role": "user", "content": "hi"}]


def test_regenerate_drops_the_last_answer_and_failed_turns_are_not_resent():
    turns = [Turn("first", answer="one"), Turn("too big", [], [IMAGE_PART], error="server error (413): big"),
             Turn("third", answer="an answer to replace")]
    assert to_messages("", turns) == [{"role": "user", "content": "first"},
                                      {"role": "assistant", "content": "one"},
                                      {"role": "user", "content": "third"}]


def test_media_part_inlines_the_file_as_a_data_url(tmp_path):
    png, mp4, txt = tmp_path / "x.png", tmp_path / "x.mp4", tmp_path / "x.txt"
    for f in (png, mp4, txt):
        f.write_bytes(b"\x00bytes")
    image = media_part(str(png))
    assert image["type"] == "image_url"
    head, data = image["image_url"]["url"].split(",")
    assert head == "data:image/png;base64" and base64.b64decode(data) == b"\x00bytes"
    assert media_part(str(mp4))["video_url"]["url"].startswith("data:video/mp4;base64,")
    with pytest.raises(gr.Error, match="x.txt: not an image or a video"):
        media_part(str(txt))


def test_chat_view_shows_media_answers_and_errors():
    turns = [Turn("look", ["/tmp/a.png"], [IMAGE_PART], answer="red"),
             Turn("again", error="server error (400 invalid_request_error): at most 1 image")]
    assert chat_view(turns) == [
        {"role": "user", "content": [{"path": "/tmp/a.png"}, "look"]}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": ["again"]},
        {"role": "assistant", "content": "⚠️ server error (400 invalid_request_error): at most 1 image"},
    ]


# ---- the HTTP side, against a scripted raw socket server (the real server is tested in the browser test) ----
@contextlib.asynccontextmanager
async def scripted_server(status: int, body: list[bytes]):
    """Answers each request with `status` and the `body` pieces (then waits for the client to hang up); the
    `closed` event tells when the client closed the connection."""
    closed = asyncio.Event()

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
        await reader.readexactly(length)
        kind = b"text/event-stream" if status == 200 else b"application/json"
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: %s\r\nconnection: close\r\n\r\n" % (status, kind))
        for piece in body:
            writer.write(piece)
            await writer.drain()
        if status == 200 and not body[-1].startswith(b"data: [DONE]"):
            await reader.read()  # b"" once the client closes its end
            closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield Backend(f"http://127.0.0.1:{port}/v1", None, "m"), closed


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def delta(text: str) -> bytes:
    return sse({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


async def collect(backend: Backend) -> str:
    return "".join([d async for d in backend.stream([{"role": "user", "content": "hi"}], 1.0, 1.0, 16)])


async def failure(backend: Backend) -> openai.APIError:
    with pytest.raises(openai.APIError) as info:
        await asyncio.wait_for(collect(backend), 10)
    return info.value


def error_of(status: int, body: list[bytes]) -> str:
    async def run():
        async with scripted_server(status, body) as (backend, _):
            return error_text(await failure(backend))
    return asyncio.run(run())


def test_streamed_deltas_are_joined():
    async def run():
        async with scripted_server(200, [delta("Hel"), delta("lo"), b"data: [DONE]\n\n"]) as (backend, _):
            return await asyncio.wait_for(collect(backend), 10)
    assert asyncio.run(run()) == "Hello"


@pytest.mark.parametrize("status,kind,message", [
    (400, "invalid_request_error", "at most 1 image(s) per prompt; got 2"),
    (401, "authentication_error", "missing or wrong API key"),
    (404, "not_found_error", "model 'x' is not served here; this server serves 'tiny'"),
    (413, "invalid_request_error", "image is 30 MB, over the 20 MB limit"),
    (503, "service_unavailable", "the waiting queue is full; retry later"),
])
def test_server_errors_become_one_readable_line(status, kind, message):
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    assert error_of(status, [body]) == f"server error ({status} {kind}): {message}"


def test_errors_inside_the_stream_and_unreachable_servers_are_readable():
    mid_stream = sse({"error": {"message": "engine died", "type": "service_unavailable", "code": 503}})
    assert error_of(200, [delta("par"), mid_stream]) == "server error (service_unavailable): engine died"
    port = free_port()  # nobody listens there
    line = error_text(asyncio.run(failure(Backend(f"http://127.0.0.1:{port}/v1", None, "m"))))
    assert line.startswith(f"cannot reach http://127.0.0.1:{port}/v1/chat/completions")


def test_cancelling_the_stream_closes_the_connection():
    """Stop cancels the Gradio task that awaits the stream: that must close the HTTP connection, since the
    server aborts a request (freeing its KV blocks) only when its client hangs up."""
    async def run():
        async with scripted_server(200, [delta("a"), delta("b"), delta("c")]) as (backend, closed):
            got = []

            async def consume():
                async for d in backend.stream([{"role": "user", "content": "hi"}], 1.0, 1.0, 16):
                    got.append(d)

            task = asyncio.create_task(consume())
            for _ in range(500):  # the server never ends this stream: only the cancel below ends it
                if len(got) == 3:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.wait_for(closed.wait(), 10)
            return got
    assert asyncio.run(run()) == ["a", "b", "c"]


def header_of(cards: list[dict], model: str | None = None) -> str:
    """The page's header against a server whose /v1/models lists `cards`."""
    import httpx

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"object": "list", "data": cards})

    backend = Backend("http://127.0.0.1:9/v1", None, model)
    backend.client = openai.AsyncOpenAI(base_url=backend.api_base, api_key="none", max_retries=0,
                                        http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)))
    return asyncio.run(backend.header())


def test_the_header_says_when_the_weights_are_random():
    card = {"id": "demo", "object": "model", "created": 0, "owned_by": "vlserve"}
    assert "weights are random" in header_of([{**card, "random_weights": True}])
    assert "weights are random" in header_of([{**card, "id": "x"}, {**card, "random_weights": True}], "demo")
    assert header_of([card]) == "Chatting with `demo` at `http://127.0.0.1:9/v1`"  # vLLM's cards have no field
    assert header_of([]).startswith("Chatting with (no model: the server lists none)")


# ---- a real browser on the page mounted by a real `vlserve serve` ----
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_S = 60  # any single thing the page should do


@pytest.fixture
def served(tiny_ckpt):
    """`vlserve serve` on the tiny checkpoint, at most 1 image per prompt (so the page can be shown an error)."""
    with live_server(tiny_ckpt, "--limit-mm-per-prompt", '{"image": 1}', "--shutdown-timeout", "5") as (base, _):
        yield base


def running_requests(base: str) -> tuple[float, float, float]:
    """(requests running, free KV blocks, total KV blocks) from the server's Prometheus metrics."""
    return tuple(metric(base, name) for name in ("num_requests_running", "kv_cache_free_blocks",
                                                 "kv_cache_total_blocks"))


def wait_for(what: str, check, timeout: float = WAIT_S, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def sync_playwright():
    """Requested before `served`, so a missing browser skips before a server starts."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's chromium to run the browser test")
    return pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright").sync_playwright


def test_chat_page_in_a_browser(sync_playwright, served, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_S * 1000)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_S * 1000)
            drive_chat(page, served, str(image))
        finally:
            browser.close()


def drive_chat(page, base: str, image: str) -> None:
    page.goto(f"{base}/ui/")
    page.wait_for_selector("text=weights are random")  # the tiny checkpoint's: the header says its answers are noise
    assert f"{base}/v1" in page.inner_text("body")
    page.click("#settings > button")
    page.fill("#max-tokens input", "20000")  # long enough that only Stop ends it
    page.press("#max-tokens input", "Tab")  # a Number takes its value on blur

    def answer() -> str:  # the last answer's text, read in one go: the page re-renders it while we look
        return page.evaluate("() => [...document.querySelectorAll('#chat [data-testid=bot]')].map(b => "
                             "b.innerText).pop() ?? ''")

    def count(role: str) -> int:  # turns, not parts: each image of a turn is a `data-testid=user` of its own
        return page.locator(f"#chat .{role}-row").count()

    def upload_and_ask(files, question):
        page.set_input_files("#ask input[type=file]", files)
        page.wait_for_function("n => document.querySelectorAll('#ask .thumbnail-item').length >= n", arg=len(files))
        page.fill("#ask textarea", question)
        page.press("#ask textarea", "Enter")

    def grows(at_least: int) -> bool:
        first = len(answer())
        time.sleep(0.5)
        return first >= at_least and len(answer()) > first

    # 1. an image and a question: the answer streams in, growing while we watch
    upload_and_ask([image], "What colour is this image?")
    wait_for("the user turn with its image", lambda: page.locator("#chat [data-testid=user] img").count() == 1)
    wait_for("the answer to grow", lambda: grows(1))
    wait_for("the answer to grow again", lambda: grows(1))
    # 2. Stop: the answer stops growing and the server aborts the request (nothing running, every KV block free)
    page.click("#stop")
    stopped = wait_for("the answer to stop growing", lambda: same_after(answer, 1.0))
    assert len(stopped) > 0
    wait_for("the server to abort the request",
             lambda: (m := running_requests(base))[0] == 0 and m[1] == m[2], timeout=15)
    wait_for("the textbox to unlock", lambda: page.locator("#ask textarea").is_enabled())
    # 3. Regenerate: the same question answered again, replacing (not adding to) the stopped answer
    page.click("#regenerate")
    wait_for("a new answer", lambda: answer() and not stopped.startswith(answer()[:20]) and grows(20))
    assert count("user") == count("bot") == 1
    # 4. Clear: the history is gone, the generation cancelled
    page.click("#clear")
    wait_for("an empty chat", lambda: count("user") == count("bot") == 0)
    wait_for("the server to abort the request", lambda: running_requests(base)[0] == 0, timeout=15)
    # 5. a server error (two images, the server allows one) shows as a readable line, not a traceback
    upload_and_ask([image, image], "Compare them")
    error = wait_for("the error line", lambda: "server error" in answer() and answer())
    assert "400" in error and "image" in error and "Traceback" not in page.inner_text("body")
    assert count("user") == count("bot") == 1  # only the new turn: Clear emptied the history
    wait_for("the textbox to unlock", lambda: page.locator("#ask textarea").is_enabled())


def same_after(read_text, seconds: float) -> str | None:
    before = read_text()
    time.sleep(seconds)
    return before if read_text() == before else None
