"""Core outputs -> RequestOutputs, in the front process: detokenization, stop strings, request times.

The engine core sends token ids; this turns them into text deltas, one RequestOutput per request that moved.
When a stop string matches, the sample ends here ("stop", stop_reason the string) and the caller must abort it in
the core (`Processed.aborts`); tokens the core sampled for it meanwhile are dropped. Offline `LLM` and the server
share this class; the server calls it from one thread only.
"""

import time
from dataclasses import dataclass, field

from vlserve.config import DEFAULT_STOP_TOKEN_IDS
from vlserve.engine.detokenizer import IncrementalDetokenizer
from vlserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from vlserve.engine.request import CoreOutput, EngineRequest


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]  # (the request's media stay out of here: their pixels are the core's)
    detokenizers: list[IncrementalDetokenizer]
    open_samples: set[int]  # indices not finished yet
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None  # [None, then a Logprob per prompt position] as they arrive


@dataclass
class Processed:
    outputs: list[RequestOutput] = field(default_factory=list)
    aborts: list[tuple[str, int]] = field(default_factory=list)  # (request id, sample) a stop string ended


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids=DEFAULT_STOP_TOKEN_IDS):
        self.tokenizer, self.eos_ids = tokenizer, tuple(eos_ids)
        self.requests: dict[str, RequestState] = {}

    def add(self, req: EngineRequest) -> None:
        detoks = [IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params, self.eos_ids)
                  for _ in range(req.params.n)]
        self.requests[req.request_id] = RequestState(
            req.request_id, req.prompt_token_ids, detoks, set(range(req.params.n)), RequestMetrics(req.arrival_time),
            prompt_logprobs=None if req.params.prompt_logprobs is None else [None])

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forgets the request; returns its final delta (every open sample ends with "abort"), None if unknown."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        outputs = [CompletionOutput(i, "", [], finish_reason="abort") for i in sorted(state.open_samples)]
        state.metrics.finished_time = time.monotonic()
        return self.request_output(state, outputs, finished=True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def process(self, core_outputs: list[CoreOutput]) -> Processed:
        now, result = time.monotonic(), Processed()
        moved: dict[str, list[CompletionOutput]] = {}
        for out in core_outputs:
            state = self.requests.get(out.request_id)
            if state is None or out.index not in state.open_samples:
                continue  # aborted, or a token sampled after a stop string had ended the sample
            if out.prompt_logprobs:
                state.prompt_logprobs.extend(out.prompt_logprobs)
            if not out.token_ids and not out.finish_reason:
                continue  # prompt logprobs alone: no delta yet
            delta = self.sample_delta(state, out, now)
            if delta.finish_reason:
                state.open_samples.discard(out.index)
                if out.finish_reason is None:
                    result.aborts.append((out.request_id, out.index))
            moved.setdefault(out.request_id, []).append(delta)
        for request_id, deltas in moved.items():
            state = self.requests[request_id]
            finished = not state.open_samples
            if finished:
                del self.requests[request_id]
                state.metrics.finished_time = now
            result.outputs.append(self.request_output(state, deltas, finished))
        return result

    def sample_delta(self, state: RequestState, out: CoreOutput, now: float) -> CompletionOutput:
        m = state.metrics
        m.first_scheduled_time = m.first_scheduled_time or out.scheduled_time
        m.first_token_time = m.first_token_time or now
        state.num_cached_tokens = out.num_cached_tokens
        detok = state.detokenizers[out.index]
        text, kept = "", 0
        for token in out.token_ids:
            text += detok.add(token)
            kept += 1
            if detok.stop_str is not None:
                break
        logprobs = out.logprobs[:kept] if out.logprobs is not None else None
        delta = CompletionOutput(out.index, text, out.token_ids[:kept], logprobs=logprobs)
        if detok.stop_str is not None:
            delta.finish_reason, delta.stop_reason = "stop", detok.stop_str
        elif out.finish_reason:
            delta.finish_reason, delta.stop_reason = out.finish_reason, out.stop_reason
        if delta.finish_reason:
            delta.text += detok.flush()
        return delta

    def request_output(self, state: RequestState, outputs: list[CompletionOutput], finished: bool) -> RequestOutput:
        return RequestOutput(state.request_id, state.prompt_token_ids, outputs, finished, state.metrics,
                             num_cached_tokens=state.num_cached_tokens, prompt_logprobs=state.prompt_logprobs)
