"""`vlserve serve` through the official openai client: chat (streaming or not, images, video, multi-turn),
completions, models, usage, and each error status; disconnects and SIGTERM free everything."""

import base64
import glob
import os
import signal
import time

import httpx
import openai
import pytest

from hf_reference import chat_prompt, image_url, text, video_url
from live_server import live_server, wait_all_blocks_free
from media_samples import png_header_only
from vlserve.config import EngineConfig
from vlserve.inputs import InputProcessor

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    flags = ["--max-model-len", "1024", "--limit-mm-per-prompt", '{"image": 2, "video": 1}',
             "--served-model-name", "tiny-vl"]
    with live_server(tiny_ckpt, *flags, api_key=KEY) as (base, proc):
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def prompt_len(ckpt, messages):
    return len(chat_prompt(InputProcessor.for_model(EngineConfig(model=str(ckpt))), messages).token_ids)


CHAT = [{"role": "user", "content": [image_url(112, 84, 1), text("What is this?")]}]


def test_chat_with_image_usage_exact(client, tiny_ckpt):
    r = client.chat.completions.create(model="tiny-vl", messages=CHAT, max_tokens=7,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == prompt_len(tiny_ckpt, CHAT)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_chat_streaming_equals_non_streaming(client):
    params = dict(model="tiny-vl", messages=CHAT, max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**params).choices[0].message.content
    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_video_and_multi_turn(client):
    messages = [{"role": "user", "content": [video_url(112, 84, 8, 4.0), text("What happens?")]},
                {"role": "assistant", "content": "Colours move."},
                {"role": "user", "content": [image_url(56, 56, 2), text("And here?")]}]
    r = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=4, n=2, seed=3,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and {c.finish_reason for c in r.choices} == {"length"}
    assert r.usage.completion_tokens == 8


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny-vl", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, logprobs=True, top_logprobs=2, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy takes the top token


def test_completions_and_models(client):
    r = client.completions.create(model="tiny-vl", prompt=["Once upon", "a time"], max_tokens=4, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    stream = client.completions.create(model="tiny-vl", prompt="Hello", max_tokens=5, stream=True,
                                       extra_body={"ignore_eos": True})
    assert sum(1 for c in stream if c.choices and c.choices[0].text) >= 1
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-vl"]
    assert models.data[0].random_weights is True  # make-tiny's checkpoint: the chat page warns of it


def test_health_version_metrics_need_no_key(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert "version" in httpx.get(f"{server}/version").json()
    assert "vlserve:time_to_first_token_seconds" in httpx.get(f"{server}/metrics").text


def test_401_without_key(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert "--api-key" in e.value.body["message"]


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError, match="tiny-vl"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def data_url(raw: bytes, mime="image/png"):
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(raw).decode()}}


@pytest.mark.parametrize("content, status, message", [
    ([data_url(b"\x89PNG\r\n\x1a\nnot really a png"), text("?")], 400, "could not decode"),
    ([image_url(56, 56, 1), image_url(56, 56, 2), image_url(56, 56, 3), text("?")], 400, "--limit-mm-per-prompt"),
    ([data_url(png_header_only(9000, 9000)), text("?")], 413, "max_source_pixels"),
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], 400, "--allowed-local-media-path"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], 400, "--allowed-media-domains"),
    ("word " * 1100, 400, "--max-model-len"),
])
def test_bad_requests(server, content, status, message):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"] and r.json()["error"]["code"] == status
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "tools"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 0}', "n "),
])
def test_malformed_bodies_are_400(server, body, message):
    r = httpx.post(f"{server}/v1/chat/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    wait_all_blocks_free(server)  # the server noticed, aborted the request and freed its KV blocks


def test_sigterm_drains_in_flight_requests(tiny_ckpt):
    with live_server(tiny_ckpt) as (base, proc):
        assert f"OpenAI API at {base}/v1, chat page at {base}/ui" in proc.output()  # where to go, said at start
        body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 40, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        events = [line for line in rest if line]
        assert '"finish_reason":"length"' in events[-2] and events[-1] == "data: [DONE]"  # finished, not cut
        assert proc.wait(timeout=30) == 0


def test_chat_page_needs_the_key_when_one_is_set(server):
    """The page holds the server's key, so it is behind a login whose password is that key."""
    assert httpx.get(f"{server}/ui/config").status_code == 401
    with httpx.Client(base_url=server) as c:
        assert c.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code != 200
        assert c.post("/ui/login", data={"username": "me", "password": KEY}).status_code == 200
        assert c.get("/ui/config").status_code == 200


def children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def test_killed_worker_fails_requests_and_the_server_exits(tiny_ckpt):
    """-tp 2: killing the second rank mid-generation gives the client an error event within 10 s, and the
    server exits non-zero so a supervisor restarts it (the in-process failure test checks /health's 503)."""
    with live_server(tiny_ckpt, "-tp", "2", "--disable-ui") as (base, proc):
        core = [p for p in children(proc.pid) if b"core_process" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert core, "no engine core process found"
        workers = [p for p in children(core[0]) if b"worker_process" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert workers, "no spawned worker found"
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        start = time.monotonic()
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(workers[0], signal.SIGKILL)
            rest = list(lines)
        assert any('"code":503' in line for line in rest) and time.monotonic() - start < 10
        assert proc.wait(timeout=15) == 1


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:8000", "does not end in /v1, where OpenAI-compatible servers (vlserve, vLLM) serve the API: "
                              "try --api-base http://127.0.0.1:8000/v1"),
    ("127.0.0.1:8000/v1", "is not an http(s) URL; e.g. http://127.0.0.1:8000/v1"),
])
def test_the_chat_page_wants_the_api_root(capsys, url, says):
    """`vlserve ui --api-base` with a server's root (the usual slip) stops at once with the URL to use."""
    from vlserve.cli import main

    assert main(["ui", "--api-base", url]) == 2
    assert says in capsys.readouterr().err
