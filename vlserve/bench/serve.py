"""`vlserve bench serve`: throughput and latency of a running OpenAI-compatible server, as vLLM's `bench serve`.

Requests arrive all at once, or as a Poisson process at --request-rate (seeded, so runs compare), with at most
--concurrency in flight. Every request streams and asks for the final usage chunk: token counts are the server's,
because a content chunk may carry several tokens, or none while the detokenizer holds back a partial character.
A request's clock starts when it is sent (after any wait for a --concurrency slot); TTFT runs to the first non-empty
content delta, ITL are the gaps between content chunks. Prompts (text, PNG images in base64) are built before the
benchmark's clock starts. Each request is bounded by --request-timeout, so a stuck server gives failed requests,
never a hung benchmark.

Mixed load (--background-streams N): N text streams of --background-output-len tokens run alone first, then again
with the workload sent once every stream has its first token. The streams' inter-token gaps are compared: alone,
and while the workload's requests are in flight (a gap counts when its chunk lands then). Their p99 ratio says how
much a burst of (image) requests slows the decodes already running.
"""

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from vlserve.bench.prompts import BenchPrompt, Workload, make_prompts, openai_image_part
from vlserve.bench.stats import (
    WIDTH, BenchSummary, Percentiles, RequestTiming, percentile_row, percentiles_ms, report, summarize, write_json,
)
from vlserve.errors import ConfigError, VLServeError
from vlserve.media.template import load_tokenizer

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
CONNECT_TIMEOUT_S = 10.0
SHOWN_ERRORS = 5


@dataclass(frozen=True)
class ServeBench:
    base_url: str  # the server's root; a trailing /v1 is dropped
    api_key: str | None = None
    model: str | None = None  # None: the first one /v1/models lists
    tokenizer: str | None = None  # None: the model folder /v1/models names (so the server must run on this machine)
    endpoint: str = "chat"
    concurrency: int | None = None  # None: no cap
    request_rate: float | None = None  # requests/s; None: all at once
    request_timeout_s: float = 300.0
    background_streams: int | None = None  # mixed load: text streams decoding while the workload arrives
    background_output_len: int = 512

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url {self.base_url!r} must start with http:// or https://")
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"--endpoint {self.endpoint!r} must be one of {', '.join(ENDPOINTS)}")
        for flag, value in (("--concurrency", self.concurrency), ("--request-rate", self.request_rate),
                            ("--request-timeout", self.request_timeout_s),
                            ("--background-streams", self.background_streams),
                            ("--background-output-len", self.background_output_len)):
            if value is not None and not 0 < value < math.inf:
                raise ConfigError(f"{flag} must be a positive number, got {value}")

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/").removesuffix("/v1")


class RequestFailed(Exception):
    """One request's failure: counted and reported, not raised out of the benchmark."""


def run_serve_bench(cfg: ServeBench, workload: Workload, json_path: str | None = None) -> BenchSummary:
    if workload.num_images and cfg.endpoint == "completions":
        raise ConfigError("--image-size: /v1/completions takes text only; use --endpoint chat for images")
    return asyncio.run(bench(cfg, workload, json_path))


async def bench(cfg: ServeBench, workload: Workload, json_path: str | None) -> BenchSummary:
    in_flight = cfg.concurrency or workload.num_prompts  # connections enough that none waits for the pool
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with httpx.AsyncClient(base_url=cfg.root, headers=headers,
                                 timeout=httpx.Timeout(cfg.request_timeout_s, connect=CONNECT_TIMEOUT_S),
                                 limits=httpx.Limits(max_connections=in_flight,
                                                     max_keepalive_connections=in_flight)) as client:
        card = await served_model(client, cfg.model)
        tokenizer = load_tokenizer(tokenizer_path(cfg, card))
        prompts = make_prompts(workload, tokenizer)
        bodies = [request_body(p, card["id"], workload, cfg.endpoint) for p in prompts]
        if cfg.background_streams:
            background = background_bodies(cfg, workload, tokenizer, card["id"])
            mixed, (timings, errors, start, elapsed) = await mixed_load(client, cfg, bodies, background, workload.seed)
        else:
            mixed, start = None, time.monotonic()
            timings, errors = await send_all(client, cfg, bodies, workload.seed)
            elapsed = time.monotonic() - start
    summary = summarize(timings, elapsed, failed_requests=len(errors))
    load = {"Concurrency": cfg.concurrency or "no cap",
            "Request rate": f"{cfg.request_rate:g}/s (Poisson)" if cfg.request_rate else "all at once"}
    print(report("vlserve bench serve", {"Server": cfg.root, "Model": card["id"], "Endpoint": ENDPOINTS[cfg.endpoint],
                                        **load}, summary))
    if mixed:
        print(mixed_report(mixed))
    if errors:
        print(f"First errors ({min(len(errors), SHOWN_ERRORS)} of {len(errors)}):",
              *(f"  {e}" for e in errors[:SHOWN_ERRORS]), sep="\n")
    if json_path:
        client_settings = {k: v for k, v in asdict(cfg).items() if k != "api_key"}  # no secret in a results file
        write_json(json_path, summary, {"server": cfg.root, "model": card["id"], "client": client_settings,
                                        "workload": asdict(workload), "errors": errors[:SHOWN_ERRORS],
                                        **({"mixed_load": as_json(mixed)} if mixed else {})})
    if not timings:
        raise VLServeError(f"all {len(errors)} requests failed; the first error: {errors[0]}")
    return summary


async def served_model(client: httpx.AsyncClient, name: str | None) -> dict:
    """The /v1/models card to benchmark; every way of not getting it is a ConfigError naming the flag to fix."""
    try:
        r = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise ConfigError(f"--base-url {client.base_url}: cannot reach the server ({type(e).__name__}: {e}); "
                          "is it running, on that host and port?") from e
    if r.status_code == 401:
        raise ConfigError("the server wants an API key: pass --api-key (or set VLSERVE_API_KEY)")
    try:
        cards = r.raise_for_status().json()["data"]
    except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--base-url {client.base_url}: GET /v1/models did not give an OpenAI model list "
                          f"(HTTP {r.status_code}: {r.text[:200]!r})") from e
    names = [c["id"] for c in cards]
    if not names:
        raise ConfigError(f"--base-url {client.base_url}: the server lists no model")
    if name is not None and name not in names:
        raise ConfigError(f"--model {name!r} is not served there; it serves {', '.join(map(repr, names))}")
    return cards[names.index(name) if name else 0]


def tokenizer_path(cfg: ServeBench, card: dict) -> str:
    """Prompts are built from token ids for exact lengths, so the benchmark needs the server's tokenizer."""
    if cfg.tokenizer:
        return cfg.tokenizer
    root = card.get("root")
    if not root or not Path(root).is_dir():
        raise ConfigError(f"the server names its model folder {root!r}, which is not on this machine; pass "
                          "--tokenizer with a folder holding the same model's tokenizer")
    return root


def request_body(prompt: BenchPrompt, model: str, w: Workload, endpoint: str) -> dict:
    body = {"model": model, "max_tokens": w.output_len, "temperature": w.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if w.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension, so sent only when asked for
    if endpoint == "chat":
        body["messages"] = prompt.messages(openai_image_part)
    else:
        body["prompt"] = prompt.text
    return body


def background_bodies(cfg: ServeBench, workload: Workload, tokenizer, model: str) -> list[dict]:
    """The mixed load's text streams: the workload's text length, no images, --background-output-len tokens."""
    text = replace(workload, num_prompts=cfg.background_streams, image_size=None, images_per_prompt=None,
                   same_image=False, output_len=cfg.background_output_len, seed=workload.seed + 1)
    return [request_body(p, model, text, cfg.endpoint) for p in make_prompts(text, tokenizer)]


async def mixed_load(client: httpx.AsyncClient, cfg: ServeBench, bodies: list[dict], background: list[dict],
                     seed: int) -> tuple[dict, tuple]:
    """The streams alone, then with the workload sent once each has its first token (or failed). Returns the
    streams' gap figures and the workload's (timings, errors, start, elapsed)."""
    uncapped = replace(cfg, concurrency=None)  # the streams all run at once, --concurrency is the workload's
    alone, alone_errors = await send_all(client, uncapped, background, seed, desc="Streams alone")
    decoding, all_decoding = 0, asyncio.Event()

    def started() -> None:
        nonlocal decoding
        decoding += 1
        if decoding == len(background):
            all_decoding.set()

    streams = asyncio.create_task(send_all(client, uncapped, background, seed, started, desc="Streams mixed"))
    waiter = asyncio.create_task(all_decoding.wait())
    await asyncio.wait([streams, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    start = time.monotonic()
    timings, errors = await send_all(client, cfg, bodies, seed)
    end = time.monotonic()
    mixed, mixed_errors = await streams
    gaps_alone = [gap for t in alone for gap in t.itl]
    gaps_mixed = [gap for t in mixed for gap, landed in zip(t.itl, t.chunk_times[1:]) if start <= landed <= end]
    figures = {"streams": len(background), "stream_output_len": cfg.background_output_len,
               "failed_streams": len(alone_errors) + len(mixed_errors),
               "itl_alone_ms": percentiles_ms(gaps_alone), "itl_during_workload_ms": percentiles_ms(gaps_mixed)}
    a, m = figures["itl_alone_ms"], figures["itl_during_workload_ms"]
    figures["itl_p99_ratio"] = m.p99 / a.p99 if a and m else None
    return figures, (timings, errors, start, end - start)


def as_json(figures: dict) -> dict:
    return {k: asdict(v) if isinstance(v, Percentiles) else v for k, v in figures.items()}


def mixed_report(figures: dict) -> str:
    ratio = figures["itl_p99_ratio"]
    return "\n".join([
        f"Mixed load: {figures['streams']} text streams of {figures['stream_output_len']} tokens "
        f"({figures['failed_streams']} failed)",
        f"{'':<{WIDTH}}{'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}",
        f"{'Stream ITL alone (ms):':<{WIDTH}}{percentile_row(figures['itl_alone_ms'])}",
        f"{'Stream ITL during workload (ms):':<{WIDTH}}{percentile_row(figures['itl_during_workload_ms'])}",
        f"{'ITL p99 during / alone:':<{WIDTH}}{'n/a' if ratio is None else f'{ratio:.2f}x'}"])


async def send_all(client: httpx.AsyncClient, cfg: ServeBench, bodies: list[dict], seed: int,
                   on_first: Callable[[], None] | None = None, desc: str = "Requests"
                   ) -> tuple[list[RequestTiming], list[str]]:
    """Successful requests' timings and failed ones' messages, in completion order. `on_first` is called once a
    request's first token came, or once it failed without one."""
    path, gate = ENDPOINTS[cfg.endpoint], asyncio.Semaphore(cfg.concurrency or len(bodies))
    timings, errors = [], []

    async def one(body: dict, bar: tqdm) -> None:
        first = [on_first] if on_first else []  # called once, by whichever comes first
        async with gate:
            try:
                timing = stream_request(client, path, body, lambda: first and first.pop()())
                timings.append(await asyncio.wait_for(timing, cfg.request_timeout_s))
            except RequestFailed as e:
                errors.append(str(e))
            except asyncio.TimeoutError:
                errors.append(f"no complete answer within --request-timeout {cfg.request_timeout_s:g} s")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            finally:
                if first:
                    first.pop()()
            bar.update()

    with tqdm(total=len(bodies), desc=desc, unit="req") as bar:
        tasks = []
        for body, gap in zip(bodies, arrival_gaps(len(bodies), cfg.request_rate, seed)):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(body, bar)))
        await asyncio.gather(*tasks)
    return timings, errors


def arrival_gaps(n: int, rate: float | None, seed: int) -> np.ndarray:
    """Seconds to wait before each request: a Poisson process is exponential gaps."""
    return np.zeros(n) if rate is None else np.random.default_rng(seed).exponential(1 / rate, n)


async def stream_request(client: httpx.AsyncClient, path: str, body: dict,
                         on_first: Callable[[], object] | None = None) -> RequestTiming:
    start = time.monotonic()
    first = end = None
    times, usage = [], None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RequestFailed(f"HTTP {r.status_code}: {error_message((await r.aread()).decode(errors='replace'))}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            chunk = parse_chunk(data)
            usage = chunk.get("usage") or usage
            now = time.monotonic()
            choices = chunk.get("choices") or []
            if choices:
                end = now  # a last chunk may carry only the finish reason
            if any(c.get("delta", {}).get("content") or c.get("text") for c in choices):
                if first is None:
                    first = now
                    if on_first:
                        on_first()
                times.append(now)
    if usage is None or end is None:
        raise RequestFailed("the stream ended without output or without a usage chunk (the server must honour "
                            "stream_options.include_usage)")
    # No visible text at all (e.g. only special tokens): the first token is known to have come by the end.
    ttft = (first if first is not None else end) - start
    return RequestTiming(usage["prompt_tokens"], usage["completion_tokens"], ttft, end - start, tuple(times))


def parse_chunk(data: str) -> dict:
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        raise RequestFailed(f"a stream event is not JSON: {data[:200]!r}") from None
    if "error" in chunk:  # the server failed mid-stream and said so in-band
        raise RequestFailed(f"error in the stream: {error_message(data)}")
    return chunk


def error_message(text: str) -> str:
    """OpenAI's error JSON -> its message; anything else as given, shortened."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:300]
