"""Schema-driven fuzzing of a live `vlserve serve`: over a thousand requests generated from its own OpenAPI schema
(valid ones, schema-violating ones, edge values and bad media spliced in) never get a 5xx, every error is OpenAI's
error JSON, and afterwards the server is healthy with every KV block free."""

import base64
import io
import json
import random
import struct
import time
import zlib

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from PIL import Image
from schemathesis import GenerationMode

from live_server import live_server, wait_all_blocks_free
from vlserve.engine.sampling_params import MAX_N

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_AUTH = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]
OPEN_PATHS = ("/health", "/version")
MAX_MODEL_LEN = 2048
MIN_REQUESTS = 1000
# (method, path, examples per generation mode). A GET takes no input: its one case goes with and without the key.
TARGETS = [("POST", "/v1/chat/completions", 300), ("POST", "/v1/completions", 300),
           ("GET", "/v1/models", 1), ("GET", "/health", 1), ("GET", "/version", 1)]
SETTINGS = settings(deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))

# What an accepted request may cost: lengths and sample counts in the accepted range are clamped to CHEAP (out of
# range, they are refused at no cost, so they stay); lists and strings are trimmed.
CHEAP = 3
ACCEPTED_UP_TO = {"max_tokens": MAX_MODEL_LEN, "max_completion_tokens": MAX_MODEL_LEN, "n": MAX_N}
MAX_ITEMS, MAX_CHARS = 8, 256

# Generated values rarely pass these fields' range checks; half the bodies go without them (and stream or not),
# so that they generate.
CHECKED = ["model", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "min_tokens", "logprobs", "top_logprobs", "mm_processor_kwargs"]
FIELDS = CHECKED + ["n", "max_tokens", "max_completion_tokens", "seed", "stop", "stop_token_ids", "stream",
                    "stream_options", "prompt", "messages", "not_a_field", "\ud800"]
EDGE_VALUES = [None, True, 0, -1, 2**63, -(2**64), 10**40, 1e308, -1e308, 5e-324, float("inf"), float("nan"),
               "", "\x00", "\ud800", "e\u0301\u202e\ufeff\U0001d518\U0001f600", [], [[]], [""], [-1], {}, {"": None}]
ODD_TEXT = ["", " ", "\x00", "\ud800", "\udfff\ud800", "\u202e\u200d\ufeff\U0001f469\u200d\U0001f4bb", "e\u0301" * 50,
            "<|im_start|>", "<|image_pad|>", "<|vision_start|><|video_pad|><|vision_end|>", "<|endoftext|>"]
MM_KEYS = ["max_pixels", "min_pixels", "fps", "max_frames", "video_total_pixels", "not_a_key"]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size (as a decompression bomb does) and holds no pixels."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


MEDIA_URLS = [
    data_url("image/png", png(32, 32)), data_url("image/png", png(1, 1000)),
    data_url("image/png", png_header_only(60000, 60000)), data_url("image/png", png(64, 64)[:60]),
    data_url("video/mp4", png(32, 32)), "data:image/png;base64,", "data:image/png;base64,%%%",
    "data:image/png;base64,\u00e9", "data:image/png,raw", "data:", "data:image/png;base64,AAAA",
    "http://example.invalid/a.png", "file:///etc/passwd", "/etc/passwd", "ftp://example.invalid/a.png", "",
]


def media_message(rnd: random.Random) -> dict:
    kind, url = rnd.choice(["image_url", "video_url"]), rnd.choice(MEDIA_URLS)
    part = {"type": kind, kind: rnd.choice([url, {"url": url}])}
    return {"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]}


def trim(value):
    if isinstance(value, str):
        return value[:MAX_CHARS]
    if isinstance(value, list):
        return [trim(v) for v in value[:MAX_ITEMS]]
    if isinstance(value, dict):
        return {k: trim(v) for k, v in value.items()}
    return value


def cheap(body: dict) -> None:
    for key, limit in ACCEPTED_UP_TO.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and CHEAP < value <= limit:
            body[key] = CHEAP
    if body.get("max_tokens") is None:  # None means "up to --max-model-len"
        body["max_tokens"] = CHEAP


def mutate(body, path: str, rnd: random.Random):
    """Trims a generated body; maybe drops the CHECKED fields, splices in an edge value, odd text, bad
    mm_processor_kwargs or a media part; then bounds its cost. Serialised here since `requests` refuses NaN and
    Infinity (which the server's JSON parser reads)."""
    if not isinstance(body, dict):
        return body  # raw bytes, a bare list, ...: malformed on purpose and free to refuse
    body = trim(body)
    chat = path == "/v1/chat/completions"
    if rnd.random() < 0.5:
        for key in CHECKED:
            body.pop(key, None)
        body["stream"] = rnd.random() < 0.5
    if rnd.random() < 0.3:
        body[rnd.choice(FIELDS)] = rnd.choice(EDGE_VALUES)
    if rnd.random() < 0.2:  # where the tokenizer reads it
        text = rnd.choice(ODD_TEXT)
        if not chat:
            body["prompt"] = rnd.choice([text, [text]])
        elif isinstance(body.get("messages"), list):
            body["messages"].append({"role": "user", "content": rnd.choice([text, [{"type": "text", "text": text}]])})
    if chat and rnd.random() < 0.1:
        body["mm_processor_kwargs"] = {rnd.choice(MM_KEYS): rnd.choice(EDGE_VALUES + [1, 10**6])}
    if chat and isinstance(body.get("messages"), list) and rnd.random() < 0.3:
        body["messages"].append(media_message(rnd))
    cheap(body)
    return json.dumps(body).encode()


def problem(path: str, authorized: bool, response) -> str | None:
    """What is wrong with one response, or None."""
    status = response.status_code
    if status >= 500:
        return f"HTTP {status}: {response.text[:300]}"
    if not authorized and not path.startswith(OPEN_PATHS) and status != 401:
        return f"HTTP {status} without the API key"
    if status >= 400:
        return error_problem(response.text, status)
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):  # lowercase keys, lists
        for line in response.text.splitlines():
            if line.startswith("data: {") and "error" in json.loads(line[6:]):
                return error_problem(line[6:], None)
    return None


def error_problem(text: str, status: int | None) -> str | None:
    """None if `text` is OpenAI's error JSON for a client error (`status`, or any below 500 in a stream)."""
    try:
        error = json.loads(text)["error"]
        code = error["code"]
        ok = (isinstance(error["message"], str) and isinstance(error["type"], str) and isinstance(code, int)
              and code < 500 and status in (None, code))
    except (ValueError, KeyError, TypeError):
        ok = False
    return None if ok else f"not OpenAI's error JSON for a client error: {text[:300]}"


def test_fuzz_openai_endpoints(tiny_ckpt):
    started = time.monotonic()
    # Critical only: 500s show in the responses, and tracebacks could fill live_server's unread stdout pipe,
    # which stalls the server.
    flags = ["--max-model-len", str(MAX_MODEL_LEN), "--uvicorn-log-level", "critical"]
    with live_server(tiny_ckpt, *flags, api_key=KEY) as (base, _), requests.Session() as session:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=AUTH)
        rnd = random.Random(0)  # the mutations' own dice: Hypothesis' draws lean towards simple values
        log = []  # (problem or None, method, path, body), one per request sent

        def send(case):
            if case.method == "POST":
                case.body = mutate(case.body, case.path, rnd)
                variants = [AUTH if rnd.random() < 0.9 else rnd.choice(NO_AUTH)]
            else:
                variants = [AUTH, *NO_AUTH]
            for headers in variants:
                try:
                    response = case.call(base_url=base, session=session, headers=headers, timeout=60)
                    found = problem(case.path, headers is AUTH, response)
                except requests.RequestException as e:  # a hang or a dead server
                    found = f"{type(e).__name__}: {e}"
                log.append((found, case.method, case.path, case.body))

        for method, path, examples in TARGETS:
            for mode in GenerationMode if method == "POST" else [GenerationMode.POSITIVE]:
                strategy = schema[path][method].as_strategy(generation_mode=mode)
                settings(SETTINGS, max_examples=examples)(given(strategy)(send))()

        problems = [entry for entry in log if entry[0]]
        print(f"{len(log)} requests, {len(problems)} problems, {time.monotonic() - started:.0f} s")
        assert not problems, "\n".join(f"{p}: {m} {u} {str(b)[:400]}" for p, m, u, b in problems[:10])
        assert len(log) >= MIN_REQUESTS
        assert requests.get(f"{base}/health", timeout=10).status_code == 200
        wait_all_blocks_free(base)
