"""The engine core: schedule, execute, sample. Nothing else: no tokenizer, no templates, no request checks.

It takes EngineRequests the input processor has validated and returns, per step, the new token ids of each sample
that moved (CoreOutput), deciding only the stops that need no text (stop tokens, max_tokens, max_model_len).
`vlserve serve` runs it in its own process (core_process.py); `LLM` calls it in-process. Both through this class.

Async scheduling (one rank; --no-async-scheduling turns it off): each `step` schedules and launches step N+1 while
step N runs on the device, then returns step N's tokens, so the device never waits for the host between steps.
Stops are therefore decided a step late: a sequence that stopped at step N was also in step N+1, whose token for
it is dropped. Under pipeline parallel one step per stage is in flight instead, each with other sequences.
"""

import gc
import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace

import torch

from vlserve.config import DEFAULT_STOP_TOKEN_IDS, EngineConfig, ModelConfig, SchedulerConfig, resolve_dtype
from vlserve.distributed.executor import make_runner
from vlserve.engine.block_manager import BlockManager
from vlserve.engine.request import Capacity, CoreOutput, EngineRequest, EngineStats, IterationTokens
from vlserve.engine.scheduler import ScheduledSeq, Scheduler
from vlserve.engine.sequence import Sequence, SequenceStatus
from vlserve.engine.stop import check_stop
from vlserve.engine.structured import Grammars, advance, matcher
from vlserve.errors import EngineDeadError
from vlserve.plan.preflight import check_before_loading

log = logging.getLogger("vlserve.engine")


class EngineCore:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.device = config.resolved_device()
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.max_model_len = config.model_len(self.model_config)
        scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.batched_tokens(self.max_model_len),
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            max_num_encoder_tokens=config.encoder_tokens(self.model_config),
        )
        torch.manual_seed(config.seed)
        plan = check_before_loading(self.model_config, config, self.device)  # the planner's checks, no weights
        self.runner = make_runner(self.model_config, config, self.device, self.dtype, progress=progress)
        self.async_scheduling = self.can_schedule_async(config)
        scheduler_config = replace(scheduler_config, async_scheduling=self.async_scheduling)
        try:
            num_blocks = self.num_kv_blocks(scheduler_config, plan.chosen.kv_blocks)
            self.runner.allocate_kv_cache(num_blocks)
        except BaseException:  # a rank died, memory ran out: release the others, so a next engine can start
            self.runner.shutdown()
            raise
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, self.runner.vision_cache.__contains__)
        self.in_flight: deque = deque()  # (scheduled, runner handle) of batches submitted, oldest first
        # Steps in flight at most: one per pipeline stage, or the one running and the next under async scheduling
        self.depth = config.pipeline_parallel_size if config.pipeline_parallel_size > 1 else 1 + self.async_scheduling
        self.eos_token_ids = DEFAULT_STOP_TOKEN_IDS
        self.requests: dict[str, list[Sequence]] = {}  # unfinished samples of each request
        self.grammars = Grammars(config.tokenizer_dir, self.model_config.vocab_size, self.eos_token_ids)
        self.compiling: dict[str, tuple[EngineRequest, Future]] = {}  # structured output: grammars being compiled
        self.iteration_tokens = IterationTokens()  # tokens of each step submitted: /metrics' iteration_tokens
        self.log_capacity(num_blocks)

    def can_schedule_async(self, config: EngineConfig) -> bool:
        if config.async_scheduling and not self.runner.reads_pending_tokens:
            log.info("async scheduling runs in one process for now: with the %s executor each step waits for the "
                     "last one's tokens", config.distributed_executor_backend)
            return False
        return config.async_scheduling

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.max_model_len, self.block_manager.num_blocks, self.block_manager.block_size,
                        str(self.device), str(self.dtype).removeprefix("torch."))

    # ---- KV sizing ----
    def num_kv_blocks(self, scheduler_config: SchedulerConfig, planned: int) -> int:
        """The plan's count on the CPU (its memory model is the CPU's allocation); a GPU profiles its memory."""
        c = self.config
        if c.num_gpu_blocks_override is not None or self.device.type == "cpu":
            return planned
        per_block = self.runner.kv_bytes_per_block()
        return self.runner.profile_free_blocks(c.gpu_memory_utilization, scheduler_config, c.media, per_block)

    def log_capacity(self, num_blocks: int) -> None:
        tokens = num_blocks * self.config.block_size
        log.info("KV cache: %d blocks of %d tokens = %d tokens; max concurrency at max_model_len %d: %.2fx",
                 num_blocks, self.config.block_size, tokens, self.max_model_len, tokens / self.max_model_len)

    # ---- requests ----
    def add(self, req: EngineRequest) -> None:
        """Queues the request's n samples. The input processor has checked it; an id in use is a caller's bug."""
        if self.runner is None:
            raise EngineDeadError("this engine was shut down; create a new one to generate")
        if req.request_id in self.requests or req.request_id in self.compiling:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.params.structured_outputs is not None:  # queued once its grammar is compiled (`admit_compiled`)
            self.compiling[req.request_id] = (req, self.grammars.compile(req.params.structured_outputs))
            return
        self.queue(req)

    def queue(self, req: EngineRequest, grammar=None) -> None:
        seqs = [Sequence(req.request_id, list(req.prompt_token_ids), req.params, media=req.media,
                         mrope_positions=req.mrope_positions, rope_delta=req.rope_delta, index=index,
                         max_tokens=req.max_tokens, arrival_time=req.arrival_time,
                         grammar=None if grammar is None else matcher(grammar))
                for index in range(req.params.n)]
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[req.request_id] = seqs

    def admit_compiled(self) -> list[CoreOutput]:
        """Queues the requests whose grammar is compiled; a compile that failed ends its request ("abort", logged:
        the input processor checked that the grammar parses, so this is xgrammar's or vlserve's bug)."""
        outputs = []
        for request_id, (req, future) in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[request_id]
            try:
                self.queue(req, future.result())
            except Exception as e:
                log.error("request %s: its structured output did not compile: %s", request_id, e)
                outputs += [CoreOutput(request_id, i, [], finish_reason="abort") for i in range(req.params.n)]
        return outputs

    def wait_for_grammars(self, timeout: float = 0.05) -> None:
        """With nothing else to do, waits (briefly) for a compile instead of spinning."""
        if self.compiling and not self.scheduler.has_unfinished() and not self.in_flight:
            wait([future for _, future in self.compiling.values()], timeout, return_when=FIRST_COMPLETED)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stops the request's unfinished samples (or sample `index` alone) and frees their blocks."""
        if self.compiling.pop(request_id, None) is not None:
            return
        seqs = self.requests.get(request_id)
        if seqs is None:
            return
        self.scheduler.abort(request_id, index)
        self.forget_finished(request_id)

    def forget_finished(self, request_id: str) -> None:
        if all(seq.is_finished for seq in self.requests[request_id]):
            del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight) or bool(self.compiling)

    def stats(self) -> EngineStats:
        bm, s = self.block_manager, self.scheduler
        return EngineStats(s.num_running, s.num_waiting, bm.usage, bm.num_free_blocks, bm.num_blocks, bm.queries,
                           bm.hits, s.num_preemptions, self.iteration_tokens)

    def shutdown(self) -> None:
        """Stops the workers and lets go of the weights, KV cache and CUDA graphs, so the next engine in this
        process gets their memory. Requests after this are refused; a second call does nothing."""
        if self.runner is None:
            return
        self.runner.shutdown()
        self.grammars.shutdown()
        self.runner, self.in_flight = None, deque()
        gc.collect()  # the runner's parts refer to each other: free them now, not at some later collection
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- one step ----
    def step(self) -> list[CoreOutput]:
        """Schedules and submits a batch, then returns the outputs of the oldest batch in flight, leaving up to
        `depth` - 1 batches running (see the module docstring)."""
        self.wait_for_grammars()
        compiled = self.admit_compiled()
        return compiled + self.step_batches()

    def step_batches(self) -> list[CoreOutput]:
        if len(self.in_flight) < self.depth:
            pipeline = self.config.pipeline_parallel_size
            active = self.scheduler.num_running + self.scheduler.num_waiting
            out = self.scheduler.schedule(max_seqs=-(-active // pipeline) if pipeline > 1 else None)
            if out.scheduled:
                self.in_flight.append(self.submit(out.scheduled, out.departed))
                if len(self.in_flight) < self.depth:
                    return []  # room for another batch before waiting on this one
        return self.complete(self.in_flight.popleft()) if self.in_flight else []

    def submit(self, scheduled: list[ScheduledSeq], departed: list[int]):
        now = time.monotonic()
        for item in scheduled:
            item.seq.scheduled_time = item.seq.scheduled_time or now
            item.seq.in_flight += 1
        self.iteration_tokens.add(sum(item.num_new_tokens for item in scheduled))
        return scheduled, self.runner.submit(scheduled, departed)

    def complete(self, batch) -> list[CoreOutput]:
        scheduled, handle = batch
        result = self.runner.wait(handle)
        for item in scheduled:
            item.seq.in_flight -= 1
        outputs, scored = [], {}
        for seq, _, logprobs in result.prompt_logprobs:  # in position order: steps complete in order
            if not seq.is_finished:
                scored[seq.seq_id] = out = CoreOutput(seq.request_id, seq.index, [], prompt_logprobs=logprobs)
                outputs.append(out)
        sampled = result.sampled
        for seq, token, logprob in zip(result.sample_seqs, sampled.token_ids, sampled.logprobs):
            if seq.is_finished:
                continue  # aborted while in flight, or stopped by the step before: the token is dropped
            self.scheduler.token_arrived(seq, token)
            out = scored.pop(seq.seq_id, None)
            if out is None:
                out = CoreOutput(seq.request_id, seq.index, [])
                outputs.append(out)
            out.token_ids, out.logprobs = [token], None if logprob is None else [logprob]
            out.num_cached_tokens = min(seq.num_cached_tokens, seq.num_prompt_tokens)
            out.scheduled_time = seq.scheduled_time
            reason = check_stop(seq, token, self.eos_token_ids, self.max_model_len)
            if seq.grammar is not None:
                reason = advance(seq.grammar, token) or reason
            if reason:
                out.finish_reason, out.stop_reason = reason, seq.stop_reason
                self.finish(seq, reason)
        return outputs

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retires a sequence whose last token arrived (it may be in a step still in flight: see `complete`)."""
        seq.status, seq.finish_reason, seq.finished_time = SequenceStatus.FINISHED, reason, time.monotonic()
        self.scheduler.finish(seq)
        self.forget_finished(seq.request_id)
