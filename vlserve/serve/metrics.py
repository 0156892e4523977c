"""Prometheus metrics: vLLM V1's families under the `vlserve:` prefix, or under `vllm:` (--metrics-prefix vllm) so
existing Grafana dashboards work unchanged.

Engine state (running, waiting, KV cache, prefix cache, preemptions, tokens per step) is read at scrape time from
the counters the engine core reports with every step, so it costs nothing per step here. Per-request families are
observed as each request's deltas pass through `Metrics.track`.
"""

import time
from contextlib import aclosing

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from vlserve.engine.async_engine import AsyncEngine
from vlserve.engine.outputs import RequestOutput
from vlserve.engine.request import ITERATION_TOKEN_BUCKETS

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)
N_BUCKETS = (1, 2, 5, 10, 20)


class EngineStateCollector:
    """Read at scrape time from the engine's own counters."""

    def __init__(self, engine: AsyncEngine, model: str, prefix: str):
        self.engine, self.model, self.prefix = engine, model, prefix

    def collect(self):
        s = self.engine.stats  # the engine core's counters, as its last step message reported them
        labels = ["model_name"]

        def family(kind, name, doc, value):
            f = kind(f"{self.prefix}:{name}", doc, labels=labels)
            f.add_metric([self.model], value)
            return f

        yield family(GaugeMetricFamily, "num_requests_running", "Sequences in the running batch.", s.num_running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).",
                     s.kv_cache_usage)
        yield family(GaugeMetricFamily, "kv_cache_free_blocks", "KV blocks free (equals the total when idle).",
                     s.free_blocks)
        yield family(GaugeMetricFamily, "kv_cache_total_blocks", "KV blocks allocated.", s.total_blocks)
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     s.prefix_cache_queries)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     s.prefix_cache_hits)
        yield family(CounterMetricFamily, "num_preemptions", "Sequences preempted (KV dropped, recomputed later).",
                     s.num_preemptions)
        yield family(CounterMetricFamily, "request_aborts",
                     "Requests ended before finishing (client gone, cancelled, shutdown).", self.engine.num_aborted)
        yield family(GaugeMetricFamily, "engine_alive", "1 while the engine core runs.", float(self.engine.is_alive))
        yield self.iteration_tokens(s.iteration_tokens)
        yield self.cache_config()

    def iteration_tokens(self, it) -> HistogramMetricFamily:
        h = HistogramMetricFamily(f"{self.prefix}:iteration_tokens_total", "Tokens computed per engine step.",
                                  labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, ITERATION_TOKEN_BUCKETS), "+Inf"), it.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        h.add_metric([self.model], buckets, it.total)
        return h

    def cache_config(self) -> GaugeMetricFamily:
        """vLLM's info family: value 1, the KV cache's settings as labels."""
        c, capacity = self.engine.config, self.engine.capacity
        labels = {"block_size": str(capacity.block_size), "num_gpu_blocks": str(capacity.num_kv_blocks),
                  "cache_dtype": capacity.dtype, "enable_prefix_caching": str(c.enable_prefix_caching),
                  "gpu_memory_utilization": str(c.gpu_memory_utilization)}
        g = GaugeMetricFamily(f"{self.prefix}:cache_config_info", "Information of the KV cache configuration.",
                              labels=list(labels))
        g.add_metric(list(labels.values()), 1.0)
        return g


class Metrics:
    def __init__(self, engine: AsyncEngine, model: str, prefix: str = "vlserve"):
        self.registry = CollectorRegistry()
        self.model = model
        self.registry.register(EngineStateCollector(engine, model, prefix))
        labels = ["model_name"]

        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"{prefix}:{name}", doc, labels, buckets=buckets, registry=self.registry)

        def counter(name, doc, extra=()):
            return Counter(f"{prefix}:{name}", doc, labels + list(extra), registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's consecutive deltas.")
        self.tpot = histogram("time_per_output_token_seconds", "A request's decode time per token after the first.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.queue = histogram("request_queue_time_seconds", "Time from arrival to first scheduling.")
        self.inference = histogram("request_inference_time_seconds", "Time from first scheduling to the last token.")
        self.prefill = histogram("request_prefill_time_seconds", "Time from first scheduling to the first token.")
        self.decode = histogram("request_decode_time_seconds", "Time from the first token to the last.")
        self.request_prompt = histogram("request_prompt_tokens", "Prompt tokens of each finished request.",
                                        TOKEN_BUCKETS)
        self.request_generation = histogram("request_generation_tokens", "Tokens generated for each finished "
                                            "request (all its samples).", TOKEN_BUCKETS)
        self.params_n = histogram("request_params_n", "The n of each request.", N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens", "The max_tokens each request ran with.",
                                           TOKEN_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.finished = counter("request_success", "Requests finished, by reason.", ["finished_reason"])

    async def track(self, stream, n: int, max_tokens: int):
        """Pass an engine delta stream through, observing latencies and counts; `n` and `max_tokens` are the
        request's."""
        m, last, generated = self.model, None, 0
        self.params_n.labels(m).observe(n)
        self.params_max_tokens.labels(m).observe(max_tokens)
        async with aclosing(stream):  # closing the wrapper closes the stream, which aborts the request
            async for delta in stream:
                now = time.monotonic()
                if last is not None:
                    self.itl.labels(m).observe(now - last)
                last = now
                tokens = sum(len(o.token_ids) for o in delta.outputs)
                generated += tokens
                self.generation_tokens.labels(m).inc(tokens)
                for o in delta.outputs:
                    if o.finish_reason:
                        self.finished.labels(m, o.finish_reason).inc()
                if delta.finished:
                    self.observe_finished(delta, generated, n)
                yield delta

    def observe_finished(self, final: RequestOutput, generated: int, n: int) -> None:
        m, t = self.model, final.metrics
        prompt = len(final.prompt_token_ids)
        self.prompt_tokens.labels(m).inc(prompt)
        self.request_prompt.labels(m).observe(prompt)
        self.request_generation.labels(m).observe(generated)
        spans = ((self.ttft, t.time_to_first_token), (self.e2e, t.e2e_latency), (self.queue, t.queue_time),
                 (self.inference, since(t.first_scheduled_time, t.finished_time)),
                 (self.prefill, since(t.first_scheduled_time, t.first_token_time)),
                 (self.decode, since(t.first_token_time, t.finished_time)))
        for histogram, value in spans:
            if value is not None:
                histogram.labels(m).observe(value)
        decode, per_sample = since(t.first_token_time, t.finished_time), generated / max(n, 1)
        if decode is not None and per_sample > 1:
            self.tpot.labels(m).observe(decode / (per_sample - 1))


def since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start
