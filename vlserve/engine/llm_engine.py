"""The engine loop: requests in, one scheduled model step at a time, token/text deltas out."""

import itertools
import logging
import time
from collections import deque

import torch

from vlserve.config import DEFAULT_STOP_TOKEN_IDS, EngineConfig, ModelConfig, SchedulerConfig, resolve_dtype
from vlserve.engine.block_manager import BlockManager
from vlserve.engine.detokenizer import IncrementalDetokenizer, check_stop
from vlserve.distributed.executor import make_runner
from vlserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from vlserve.engine.sampler import Sampler
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.scheduler import ScheduledSeq, Scheduler
from vlserve.engine.sequence import MediaSpan, Sequence, SequenceStatus
from vlserve.errors import InvalidRequestError
from vlserve.media.item import MediaItem
from vlserve.media.positions import mrope_positions
from vlserve.media.template import load_tokenizer
from vlserve.plan.preflight import check_before_loading

log = logging.getLogger("vlserve.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.device = config.resolved_device()
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.max_model_len = config.model_len(self.model_config)
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.batched_tokens(self.max_model_len),
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
        self.tokenizer = load_tokenizer(config.model)
        torch.manual_seed(config.seed)
        check_before_loading(self.model_config, config, self.device)  # the planner's checks and fixes, no weights read
        self.runner = make_runner(self.model_config, config, self.device, self.dtype, progress=progress)
        num_blocks = self.num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.in_flight: deque = deque()  # (scheduled, runner handle) of batches submitted, oldest first
        self.sampler = Sampler(DEFAULT_STOP_TOKEN_IDS)
        self.eos_token_ids = DEFAULT_STOP_TOKEN_IDS
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.requests: dict[str, list[Sequence]] = {}
        self.request_counter = itertools.count()
        self.log_capacity(num_blocks)

    # ---- KV sizing ----
    def num_kv_blocks(self) -> int:
        c = self.config
        if c.num_gpu_blocks_override is not None:
            return c.num_gpu_blocks_override
        per_block = self.runner.kv_bytes_per_block()
        if self.device.type == "cpu":
            return max(1, int(c.kv_cache_memory_gib * 2**30) // per_block)
        return self.runner.profile_free_blocks(c.gpu_memory_utilization, self.scheduler_config, c.media, per_block)

    def log_capacity(self, num_blocks: int) -> None:
        tokens = num_blocks * self.config.block_size
        log.info("KV cache: %d blocks of %d tokens = %d tokens; max concurrency at max_model_len %d: %.2fx",
                 num_blocks, self.config.block_size, tokens, self.max_model_len, tokens / self.max_model_len)

    # ---- requests ----
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, media: list[MediaItem] = (),
                    request_id: str | None = None) -> str:
        """Validates the request fully (raising InvalidRequestError) before anything is scheduled."""
        request_id = request_id or f"req-{next(self.request_counter)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use; ids must be unique")
        spans = self.validate(prompt_token_ids, params, list(media))
        positions, delta = (mrope_positions(prompt_token_ids, list(media), self.model_config)
                            if media else (None, 0))
        max_tokens = self.max_tokens(prompt_token_ids, params)
        seqs = []
        for index in range(params.n):
            seq = Sequence(request_id, list(prompt_token_ids), params, media=spans, mrope_positions=positions,
                           rope_delta=delta, index=index, max_tokens=max_tokens)
            self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params,
                                                                   self.eos_token_ids)
            seqs.append(seq)
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        return request_id

    def max_tokens(self, ids: list[int], params: SamplingParams) -> int:
        return params.max_tokens or self.max_model_len - len(ids)

    def validate(self, ids: list[int], params: SamplingParams, media: list[MediaItem]) -> list[MediaSpan]:
        """Every check a request must pass, before anything is scheduled; reads only configuration."""
        if not ids:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        if any(not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.model_config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens, but --max-model-len is {self.max_model_len} (prompt plus "
                "output); shorten the prompt (or use smaller images via max_pixels) or raise --max-model-len")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens {params.max_tokens} plus the prompt's {len(ids)} tokens exceed --max-model-len "
                f"{self.max_model_len}; ask for at most {self.max_model_len - len(ids)} tokens")
        limits = dict(self.config.limit_mm_per_prompt)
        for modality in ("image", "video"):
            count = sum(item.modality == modality for item in media)
            if count > limits.get(modality, 0):
                raise InvalidRequestError(
                    f"the prompt has {count} {modality}(s), over the limit of {limits.get(modality, 0)}; send "
                    f"fewer or raise --limit-mm-per-prompt '{{\"{modality}\": {count}}}'")
        self.scheduler.check_fits(len(ids), self.max_tokens(ids, params))
        return media_spans(ids, media, self.model_config)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops the request's unfinished sequences and frees their blocks; returns their final (empty) deltas."""
        if request_id not in self.requests:
            return None
        outputs = []
        for seq in self.scheduler.abort(request_id):
            self.detokenizers.pop(seq.seq_id, None)
            outputs.append(CompletionOutput(seq.index, "", [], finish_reason="abort"))
        return self.request_output(request_id, outputs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def shutdown(self) -> None:
        self.runner.shutdown()

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """Schedules and submits a batch, then returns the outputs of the oldest batch in flight. With pipeline
        parallel, up to one batch per stage is in flight (disjoint sequences), so every stage has work."""
        depth = self.config.pipeline_parallel_size
        if len(self.in_flight) < depth:
            active = self.scheduler.num_running + self.scheduler.num_waiting
            out = self.scheduler.schedule(max_seqs=-(-active // depth) if depth > 1 else None)
            if out.scheduled:
                self.in_flight.append(self.submit(out.scheduled))
                if len(self.in_flight) < depth:
                    return []  # room for another batch before waiting on this one
        return self.complete(self.in_flight.popleft()) if self.in_flight else []

    def submit(self, scheduled: list[ScheduledSeq]):
        now = time.monotonic()
        for item in scheduled:
            item.seq.scheduled_time = item.seq.scheduled_time or now
            item.seq.in_flight = True
        return scheduled, self.runner.submit([(item.seq, item.num_new_tokens) for item in scheduled])

    def complete(self, batch) -> list[RequestOutput]:
        scheduled, handle = batch
        seqs, logits = self.runner.wait(handle)
        for item in scheduled:
            item.seq.in_flight = False
            item.seq.num_computed_tokens += item.num_new_tokens
        live = [i for i, seq in enumerate(seqs) if not seq.is_finished]  # aborted while in flight
        if not live:
            return []
        if len(live) < len(seqs):
            seqs, logits = [seqs[i] for i in live], logits[live]
        return self.append_tokens(seqs, self.sampler(logits, seqs))

    def append_tokens(self, seqs: list[Sequence], sampled) -> list[RequestOutput]:
        now = time.monotonic()
        deltas: dict[str, list[CompletionOutput]] = {}
        for i, seq in enumerate(seqs):
            token = sampled.token_ids[i]
            seq.output_token_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            logprob = sampled.logprobs[i]
            if logprob is not None:
                seq.output_logprobs.append(logprob)
            detok = self.detokenizers[seq.seq_id]
            text = detok.add(token)
            reason = check_stop(seq, token, self.eos_token_ids, self.max_model_len, detok)
            if reason:
                text += detok.flush()
            delta = CompletionOutput(seq.index, text, [token], logprobs=[logprob] if logprob else None)
            if reason:
                self.finish(seq, reason, now)
                delta.finish_reason, delta.stop_reason = seq.finish_reason, seq.stop_reason
            deltas.setdefault(seq.request_id, []).append(delta)
        return [self.request_output(request_id, outputs) for request_id, outputs in deltas.items()]

    def finish(self, seq: Sequence, reason: str, now: float) -> None:
        seq.status, seq.finish_reason, seq.finished_time = SequenceStatus.FINISHED, reason, now
        self.scheduler.finish(seq)
        self.detokenizers.pop(seq.seq_id, None)

    def request_output(self, request_id: str, outputs: list[CompletionOutput]) -> RequestOutput:
        seqs = self.requests[request_id]
        finished = all(seq.is_finished for seq in seqs)
        if finished:
            del self.requests[request_id]
        first = seqs[0]
        return RequestOutput(request_id, first.prompt_token_ids, outputs, finished, request_metrics(seqs),
                             num_cached_tokens=min(first.num_cached_tokens, first.num_prompt_tokens))


def request_metrics(seqs: list[Sequence]) -> RequestMetrics:
    """A request's times: its first sample's start and first token, its last sample's end."""
    first = seqs[0]
    if len(seqs) == 1:  # the common case, every step for every running request: no scans
        return RequestMetrics(first.arrival_time, first.scheduled_time, first.first_token_time, first.finished_time)
    return RequestMetrics(first.arrival_time, min((s.scheduled_time for s in seqs if s.scheduled_time), default=None),
                          min((s.first_token_time for s in seqs if s.first_token_time), default=None),
                          max((s.finished_time for s in seqs if s.finished_time), default=None))


def media_spans(ids: list[int], media: list[MediaItem], cfg: ModelConfig) -> list[MediaSpan]:
    """Locate each item's run of pad tokens (pads must be expanded: item k owns the k-th run of num_tokens)."""
    pads = {cfg.image_token_id, cfg.video_token_id} if cfg.is_multimodal else set()
    spans, i = [], 0
    for item in media:
        while i < len(ids) and ids[i] not in pads:
            i += 1
        if i + item.num_tokens > len(ids) or any(t not in pads for t in ids[i:i + item.num_tokens]):
            raise InvalidRequestError(f"the prompt does not hold {item.num_tokens} pad tokens for its "
                                      f"{item.modality} #{len(spans) + 1}; expand the pads with the chat template")
        spans.append(MediaSpan(item, i, i + item.num_tokens))
        i += item.num_tokens
    if any(t in pads for t in ids[i:]):
        raise InvalidRequestError("the prompt holds more image/video pad tokens than its media need")
    return spans
