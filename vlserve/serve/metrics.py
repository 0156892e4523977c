"""Prometheus metrics, named as vLLM's with the `vlserve:` prefix (dashboards need only the prefix changed)."""

import time
from contextlib import aclosing

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vlserve.engine.async_engine import AsyncEngine
from vlserve.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)


class EngineStateCollector:
    """Read at scrape time from the engine's own counters, so they cost nothing per step."""

    def __init__(self, engine: AsyncEngine, model: str):
        self.engine, self.model = engine, model

    def collect(self):
        s = self.engine.stats  # the engine core's counters, as its last step message reported them
        labels = ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"vlserve:{name}", doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"vlserve:{name}", doc, labels=labels)
            c.add_metric([self.model], value)
            return c

        yield gauge("num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", s.kv_cache_usage)
        yield gauge("kv_cache_free_blocks", "KV blocks free (leak check: equals total when idle).", s.free_blocks)
        yield gauge("kv_cache_total_blocks", "KV blocks allocated.", s.total_blocks)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("num_preemptions", "Sequences preempted (KV dropped, recomputed later).", s.num_preemptions)
        yield counter("request_aborts", "Requests ended before finishing (client gone, cancelled, shutdown).",
                      self.engine.num_aborted)
        yield gauge("engine_alive", "1 while the engine core runs.", float(self.engine.is_alive))


class Metrics:
    def __init__(self, engine: AsyncEngine, model: str):
        self.registry = CollectorRegistry()
        self.model = model
        self.registry.register(EngineStateCollector(engine, model))
        labels = ["model_name"]

        def histogram(name, doc):
            return Histogram(f"vlserve:{name}", doc, labels, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's consecutive deltas.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.queue = histogram("request_queue_time_seconds", "Time from arrival to first scheduling.")
        self.prompt_tokens = Counter("vlserve:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("vlserve:generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry)
        self.finished = Counter("vlserve:request_success", "Requests finished, by reason.",
                                labels + ["finished_reason"], registry=self.registry)

    async def track(self, stream):
        """Pass an engine delta stream through, observing latencies and counts."""
        m, last = self.model, None
        async with aclosing(stream):  # closing the wrapper closes the stream, which aborts the request
            async for delta in stream:
                now = time.monotonic()
                if last is not None:
                    self.itl.labels(m).observe(now - last)
                last = now
                self.generation_tokens.labels(m).inc(sum(len(o.token_ids) for o in delta.outputs))
                for o in delta.outputs:
                    if o.finish_reason:
                        self.finished.labels(m, o.finish_reason).inc()
                if delta.finished:
                    self.observe_finished(delta)
                yield delta

    def observe_finished(self, final: RequestOutput) -> None:
        m, t = self.model, final.metrics
        self.prompt_tokens.labels(m).inc(len(final.prompt_token_ids))
        for histogram, value in ((self.ttft, t.time_to_first_token), (self.e2e, t.e2e_latency),
                                 (self.queue, t.queue_time)):
            if value is not None:
                histogram.labels(m).observe(value)
