"""What crosses between the front process and the engine core: a validated request in, per-step token outputs and
the engine's counters out. Plain dataclasses, so they travel over IPC (vlserve/engine/ipc.py) as they are.

Contract: the input processor (vlserve/inputs/) has checked every rule before an EngineRequest exists, so the core
schedules it without checking again; the core reports tokens and the stops it decides (stop tokens, max_tokens,
max_model_len); stop strings, text and logprob text are the output processor's.
"""

import bisect
import time
from dataclasses import dataclass, field

import torch

from vlserve.engine.sampler import Logprob
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.sequence import MediaSpan


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]  # media pads expanded: one per merged vision token
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what max_model_len leaves
    media: list[MediaSpan] = field(default_factory=list)  # in prompt order, items preprocessed
    mrope_positions: torch.Tensor | None = None  # (3, prompt_len) int64 when there is media
    rope_delta: int = 0
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class CoreOutput:
    """One sample (sequence) of a request that moved in a step."""
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None  # "stop" (a stop token) | "length"; stop strings are the front's to find
    stop_reason: int | None = None  # the request's own stop token id that ended it
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    scheduled_time: float | None = None  # when the sample was first scheduled (time.monotonic, same clock)
    # prompt_logprobs: the next prompt positions' (scores arrive in order, a chunk of the prompt at a time)
    prompt_logprobs: list[Logprob] | None = None


@dataclass
class EngineStats:
    """The core's counters, sent with every step's outputs (and after commands): /metrics reads them."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    free_blocks: int = 0
    total_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    iteration_tokens: "IterationTokens" = field(default_factory=lambda: IterationTokens())


ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class IterationTokens:
    """Tokens per engine step since the start, as a histogram: counts[i] steps of at most
    ITERATION_TOKEN_BUCKETS[i] tokens (and above the one before); the last count, above them all."""
    counts: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKEN_BUCKETS) + 1))
    total: int = 0

    def add(self, tokens: int) -> None:
        self.counts[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, tokens)] += 1
        self.total += tokens


@dataclass
class Capacity:
    """What the engine core reports once it has loaded: the input processor checks requests against it."""
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    device: str = "cpu"
    dtype: str = "float32"
