"""The front door, measured: preprocessing throughput, /health under hostile load, and the server's overhead.

    python benchmarks/front_door.py [MODEL] [--json OUT]          # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/front_door.py ...   # the baseline, the same script

1. preprocess: chat requests with one 1280x720 PNG each (distinct pixels, base64 data URL, as clients send them)
   turned into engine inputs, by 1 thread and by every core; requests/s. Through the input processor where
   there is one (`vlserve.inputs`), else through the old path (load_chat_media + build_chat_prompt).
2. health: `vlserve serve --max-model-len 4096` while 50 clients each send a 300,000-word chat prompt: /health
   latency (median, max) polled every 50 ms until every client has its answer.
3. overhead: the same text workload through HTTP (`vlserve serve` + `vlserve bench serve`) and offline
   (`vlserve bench offline`, the engine in-process): output tokens/s each, and their ratio.
"""

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from live_server import live_server, raw_post  # noqa: E402

from vlserve.config import EngineConfig  # noqa: E402
from vlserve.engine.sampling_params import SamplingParams  # noqa: E402


def png_url(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = (rng.uniform(0, 255, 3) + x[..., None] * rng.uniform(-1, 1, 3) + y[..., None] * rng.uniform(-1, 1, 3))
    buf = io.BytesIO()
    Image.fromarray((pixels % 256).astype(np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(1280, 720, seed)}},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def preprocessor(model: str):
    """messages -> engine inputs, by whichever front door this checkout has."""
    config = EngineConfig(model=model)
    try:
        from vlserve.inputs import InputProcessor
    except ImportError:  # before the input processor: the server's old path
        from vlserve.config import ModelConfig
        from vlserve.media.template import build_chat_prompt, load_chat_media, load_tokenizer
        cfg, tokenizer = ModelConfig.from_dir(model), load_tokenizer(model)
        return lambda i, messages: build_chat_prompt(
            tokenizer, cfg, messages, load_chat_media(messages, config.media_policy, config.media, cfg))
    processor = InputProcessor.for_model(config)
    return lambda i, messages: processor.chat(f"bench-{i}", messages, SamplingParams(max_tokens=16))


def bench_preprocess(model: str, num_requests: int) -> dict:
    prepare = preprocessor(model)
    requests = [image_chat(i) for i in range(num_requests)]
    prepare(-1, image_chat(num_requests))  # warm-up: imports, first allocations
    results = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(prepare, range(num_requests), requests))
            elapsed = time.perf_counter() - start
        results[f"{threads}_threads_req_per_s"] = num_requests / elapsed
        print(f"preprocess: {threads:>2} thread(s): {num_requests / elapsed:7.1f} requests/s "
              f"(one 1280x720 PNG each)", flush=True)
    return results


def health_under_load(base: str, clients: int, words: int) -> dict:
    """/health latency while `clients` threads each POST one huge chat prompt (raw sockets: the whole request
    leaves in one C-level sendall, so this process adds no latency of its own to the probes)."""
    body = json.dumps({"messages": [{"role": "user", "content": "word " * words}], "max_tokens": 8}).encode()
    latencies = []
    with httpx.Client(base_url=base, timeout=600) as probe, ThreadPoolExecutor(clients) as pool:
        senders = [pool.submit(raw_post, base, "/v1/chat/completions", body) for _ in range(clients)]
        while not all(f.done() for f in senders) or len(latencies) < 5:
            start = time.perf_counter()
            probe.get("/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
        statuses = [f.result()[0] for f in senders]
    return {"health_median_ms": statistics.median(latencies) * 1e3, "health_max_ms": max(latencies) * 1e3,
            "health_probes": len(latencies), "answers": {str(s): statuses.count(s) for s in set(statuses)}}


def bench_health(model: str, clients: int, words: int) -> dict:
    with live_server(model, "--max-model-len", "4096", "--disable-ui") as (base, _):
        start = time.perf_counter()
        result = health_under_load(base, clients, words)
        result["seconds"] = time.perf_counter() - start
    print(f"health: {clients} clients x {words:,}-word prompts: /health median {result['health_median_ms']:.1f} ms, "
          f"max {result['health_max_ms']:.1f} ms over {result['health_probes']} probes; answers "
          f"{result['answers']} in {result['seconds']:.1f} s", flush=True)
    return result


def bench_overhead(model: str, workload: list[str], flags: list[str]) -> dict:
    cli = [sys.executable, "-m", "vlserve.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        offline_json, serve_json = f"{tmp}/offline.json", f"{tmp}/serve.json"
        subprocess.run([*cli, "bench", "offline", model, *workload, *flags, "--json", offline_json], check=True,
                       stdout=subprocess.DEVNULL)
        with live_server(model, "--disable-ui", *flags) as (base, _):
            subprocess.run([*cli, "bench", "serve", "--base-url", base, *workload, "--json", serve_json],
                           check=True, stdout=subprocess.DEVNULL)
        offline, served = (json.loads(Path(f).read_text()) for f in (offline_json, serve_json))
    pick = ("output_tokens_per_s", "requests_per_s", "ttft_ms", "failed_requests")
    result = {"offline": {k: offline.get(k) for k in pick}, "http": {k: served.get(k) for k in pick}}
    result["http_over_offline"] = served["output_tokens_per_s"] / offline["output_tokens_per_s"]
    print(f"overhead: offline {offline['output_tokens_per_s']:.1f} output tok/s, HTTP "
          f"{served['output_tokens_per_s']:.1f} -> HTTP / offline = {result['http_over_offline']:.3f} "
          f"(TTFT p50 offline {offline['ttft_ms']['p50']:.1f} ms, HTTP {served['ttft_ms']['p50']:.1f} ms)", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="checkpoint folder (default: the demo checkpoint)")
    p.add_argument("--requests", type=int, default=32, help="requests in the preprocessing section")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--words", type=int, default=300_000)
    p.add_argument("--num-prompts", type=int, default=64, help="requests in the overhead section")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens in the overhead section")
    p.add_argument("--output-len", type=int, default=64, help="output tokens in the overhead section")
    p.add_argument("--engine-flags", default="", help="extra engine flags for the overhead section, e.g. "
                   "'--load-format dummy --max-model-len 4096'")
    p.add_argument("--skip", nargs="*", default=[], choices=["preprocess", "health", "overhead"])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.model is None:
        from vlserve.model.tiny import demo_checkpoint
        args.model = str(demo_checkpoint())
    import vlserve
    results = {"vlserve": str(Path(vlserve.__file__).parent), "cpu_count": os.cpu_count()}
    if "preprocess" not in args.skip:
        results["preprocess"] = bench_preprocess(args.model, args.requests)
    if "health" not in args.skip:
        results["health"] = bench_health(args.model, args.clients, args.words)
    if "overhead" not in args.skip:
        workload = ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
                    str(args.output_len)]
        results["overhead"] = bench_overhead(args.model, workload, args.engine_flags.split())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
