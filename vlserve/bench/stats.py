"""Benchmark figures: per-request timings in; throughput, latency percentiles, a printed table and JSON out.

Shared by the offline benchmark and serving ones: nothing here knows where the timings came from.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vlserve.errors import ConfigError

WIDTH = 34  # label column of the printed table


@dataclass(frozen=True)
class RequestTiming:
    prompt_tokens: int
    output_tokens: int
    ttft: float  # seconds from submission to the first output token
    latency: float  # seconds from submission to the last output token
    chunk_times: tuple[float, ...] = ()  # time.monotonic() of each streamed content chunk (serving only)

    @property
    def itl(self) -> tuple[float, ...]:
        """Gaps between streamed chunks (a chunk may carry several tokens)."""
        return tuple(b - a for a, b in zip(self.chunk_times, self.chunk_times[1:]))

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; undefined for a single token."""
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class Percentiles:
    mean: float
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class BenchSummary:
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_ms: Percentiles | None
    tpot_ms: Percentiles | None
    e2e_latency_ms: Percentiles | None
    itl_ms: Percentiles | None = None  # None where nothing was streamed
    failed_requests: int | None = None  # None where a request cannot fail without failing the benchmark
    # engine counters: None where the benchmark cannot see them
    prefix_cache_hit_rate: float | None = None  # prompt tokens found in the prefix cache / prompt tokens looked up
    preemptions: int | None = None


def percentiles_ms(seconds: list[float]) -> Percentiles | None:
    """Mean and p50/p90/p99 in milliseconds, interpolated linearly as numpy.percentile's default."""
    if not seconds:
        return None
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    p50, p90, p99 = np.percentile(ms, (50, 90, 99))
    return Percentiles(float(ms.mean()), float(p50), float(p90), float(p99))


def summarize(timings: list[RequestTiming], elapsed_s: float, prefix_cache_hit_rate: float | None = None,
              preemptions: int | None = None, failed_requests: int | None = None) -> BenchSummary:
    """`timings` are the successful requests'; the rates count only them."""
    prompt = sum(t.prompt_tokens for t in timings)
    output = sum(t.output_tokens for t in timings)
    return BenchSummary(
        num_requests=len(timings), prompt_tokens=prompt, output_tokens=output, elapsed_s=elapsed_s,
        requests_per_s=len(timings) / elapsed_s, output_tokens_per_s=output / elapsed_s,
        total_tokens_per_s=(prompt + output) / elapsed_s,
        ttft_ms=percentiles_ms([t.ttft for t in timings]),
        tpot_ms=percentiles_ms([t.tpot for t in timings if t.tpot is not None]),
        e2e_latency_ms=percentiles_ms([t.latency for t in timings]),
        itl_ms=percentiles_ms([gap for t in timings for gap in t.itl]), failed_requests=failed_requests,
        prefix_cache_hit_rate=prefix_cache_hit_rate, preemptions=preemptions,
    )


def report(title: str, context: dict[str, str], s: BenchSummary) -> str:
    """The human-readable table; `context` (model, device, ...) goes on top. Requests are the successful ones."""
    failed = [] if s.failed_requests is None else [("Failed requests", s.failed_requests)]
    itl = [] if s.itl_ms is None else [("ITL (ms)", percentile_row(s.itl_ms))]
    rows = [*context.items(),
            ("Requests", s.num_requests), *failed, ("Prompt tokens", s.prompt_tokens),
            ("Output tokens", s.output_tokens), ("Elapsed (s)", f"{s.elapsed_s:.2f}"),
            ("Requests/s", f"{s.requests_per_s:.2f}"), ("Output tok/s", f"{s.output_tokens_per_s:.1f}"),
            ("Total tok/s", f"{s.total_tokens_per_s:.1f}"),
            ("", f"{'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}"),
            ("TTFT (ms)", percentile_row(s.ttft_ms)), ("TPOT (ms)", percentile_row(s.tpot_ms)), *itl,
            ("E2E latency (ms)", percentile_row(s.e2e_latency_ms))]
    if s.prefix_cache_hit_rate is not None:
        rows.append(("Prefix cache hit rate", f"{s.prefix_cache_hit_rate:.1%}"))
    if s.preemptions is not None:
        rows.append(("Preemptions", s.preemptions))
    rule = "=" * (WIDTH + 40)
    lines = [f" {title} ".center(len(rule), "="), *(f"{f'{k}:' if k else '':<{WIDTH}}{v}" for k, v in rows), rule]
    return "\n".join(lines)


def percentile_row(p: Percentiles | None) -> str:
    return "n/a" if p is None else f"{p.mean:9.2f} {p.p50:9.2f} {p.p90:9.2f} {p.p99:9.2f}"


def write_json(path: str | Path, summary: BenchSummary, context: dict) -> None:
    """`context` (model, device, settings) first, then every summary field; percentiles as objects."""
    try:
        Path(path).write_text(json.dumps({**context, **asdict(summary)}, indent=2) + "\n")
    except OSError as e:
        raise ConfigError(f"--json {path}: cannot write the results: {e}") from e
