"""What the engine hands back: per step, the new tokens and text of each sequence that moved (a delta)."""

from dataclasses import dataclass


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # a step's delta, or the whole text once accumulated
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list | None = None  # per token: sampler.Logprob (the token's logprob and top alternatives)

    def extend(self, delta: "CompletionOutput") -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # prompt_logprobs: None for the first token, then per prompt token its Logprob (its logprob and the top ones)
    prompt_logprobs: list | None = None

    @classmethod
    def start(cls, delta: "RequestOutput") -> "RequestOutput":
        """An empty output for the request `delta` belongs to, to `add` its deltas into."""
        return cls(delta.request_id, delta.prompt_token_ids, [], False, delta.metrics)

    def add(self, delta: "RequestOutput") -> None:
        """Accumulate a later delta of the same request; samples stay in index order."""
        for out in delta.outputs:
            mine = next((o for o in self.outputs if o.index == out.index), None)
            if mine is None:
                mine = CompletionOutput(out.index, "", [])
                self.outputs.append(mine)
                self.outputs.sort(key=lambda o: o.index)
            mine.extend(out)
        self.finished, self.metrics, self.num_cached_tokens = delta.finished, delta.metrics, delta.num_cached_tokens
        self.prompt_logprobs = delta.prompt_logprobs
