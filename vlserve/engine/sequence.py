"""One generated sequence: its prompt, media, KV blocks and outputs as the engine moves it through its life."""

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from vlserve.engine.sampling_params import SamplingParams
from vlserve.media.item import MediaItem


class SequenceStatus(Enum):
    WAITING = auto()  # not admitted, or preempted (its KV freed; it recomputes from the prompt)
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class MediaSpan:
    """Where a run of one media item's pad tokens sits in the prompt: the whole item, or (Qwen3-VL's videos) one
    frame of it, its pads after the frame's timestamp text."""

    item: MediaItem
    start: int  # index of the first pad token
    end: int  # one past the last
    offset: int = 0  # the item's embedding row of the first pad

    @property
    def content_hash(self) -> str:
        return self.item.content_hash


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    media: list[MediaSpan] = field(default_factory=list)
    mrope_positions: torch.Tensor | None = None  # (3, prompt_len) for multimodal prompts
    rope_delta: int = 0  # decode token i (0-based over all tokens) sits at position i + rope_delta
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    index: int = 0  # which of the request's n samples this is
    max_tokens: int = 16  # params.max_tokens, or what max_model_len leaves when that is None
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained, of full blocks; tokens only grow, so kept
    # Tokens whose KV is in the cache or being computed by a step already scheduled (prefix-cache hits included)
    num_computed_tokens: int = 0
    # Tokens sampled (or being sampled) on the device by steps in flight and not yet appended to output_token_ids:
    # under async scheduling the next step is scheduled before the last one's token reaches the host.
    num_pending_tokens: int = 0
    num_findable_blocks: int = 0  # leading full blocks already findable in the prefix cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    in_flight: int = 0  # steps holding this sequence whose results have not come back
    prompt_ids_tensor: torch.Tensor | None = None  # the sampler's copy of the prompt ids on the logits' device
    allowed_ids_tensor: torch.Tensor | None = None  # ... and of params.allowed_token_ids
    grammar: Any = None  # structured output: this sample's xgrammar matcher (engine/structured.py)
    prompt_logprobs_next: int = 1  # the next prompt position whose logprob is owed (the first token has none)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return self.num_tokens + self.num_pending_tokens

    @property
    def num_outputs_with_pending(self) -> int:
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end], without copying the whole sequence."""
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[start:end] + self.output_token_ids[max(start - p, 0):max(end - p, 0)]

    @property
    def owes_prompt_logprobs(self) -> bool:
        """prompt_logprobs asked and not all computed: sample 0 computes them (the others share its prompt)."""
        return (self.params.prompt_logprobs is not None and self.index == 0
                and self.prompt_logprobs_next < self.num_prompt_tokens)

    def prompt_logprob_positions(self, start: int, end: int) -> range:
        """The prompt positions whose logprobs tokens [start, end) give and are still owed: token i's logits score
        token i + 1."""
        if not self.owes_prompt_logprobs:
            return range(0)
        return range(max(start + 1, self.prompt_logprobs_next), min(end + 1, self.num_prompt_tokens))

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while tokens other than the newest one still need their KV computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    def media_hashes_in(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the media whose pad tokens overlap token range [start, end)."""
        return tuple(span.content_hash for span in self.media if span.start < end and start < span.end)

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone; prompt and generated tokens are recomputed as one longer prefill."""
        self.status = SequenceStatus.WAITING
        self.block_table = []
        self.num_findable_blocks = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions += 1
