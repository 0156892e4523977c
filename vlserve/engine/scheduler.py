"""Continuous batching: each step, which sequences compute how many tokens, within token, seat and KV budgets.

Strict first-come first-served: running sequences go first, oldest first; then waiting ones are admitted from the
head of the queue until one does not fit, so no request is overtaken. When KV blocks run out, the newest running
sequence is preempted (its KV dropped, recomputed later from its tokens) and requeued at the front.

Contract with the engine: a scheduled sequence computes tokens [num_computed_tokens, num_computed_tokens +
num_new_tokens); `schedule` has already made their full blocks findable in the prefix cache. After the step the
engine adds num_new_tokens to num_computed_tokens, appends a sampled token where the chunk reached the last token,
and calls `finish` on each sequence that is done. `abort` and `finish` run between steps. Under pipeline parallel a
sequence may be `in_flight` (its step not back yet): it is skipped, and never preempted.
"""

import time
from collections import deque
from dataclasses import dataclass, field

from vlserve.config import SchedulerConfig
from vlserve.engine.block_manager import BlockManager
from vlserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # computed this step, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # back in the waiting queue, KV dropped

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager):
        self.cfg = cfg
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        # Oldest first. Appending on admission keeps that order: a preempted sequence was the newest running one
        # and returns at the head of the queue, so nothing newer can be admitted before it.
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total, for metrics

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """The input processor has checked that seq fits the cache alone (inputs/checks.py check_fits): a
        sequence that never could would block the queue's head forever."""
        self.waiting.append(seq)

    def schedule(self, max_seqs: int | None = None) -> SchedulerOutput:
        """max_seqs: sequences in this step at most (pipeline parallel splits the running ones into a batch per
        stage); the seat limit, --max-num-seqs, counts every running sequence, in flight or not."""
        out = SchedulerOutput()
        budget, short_of_blocks = self.cfg.max_num_batched_tokens, False
        max_seqs = max_seqs or self.cfg.max_num_seqs
        for seq in list(self.running):  # a copy: making room may preempt the newest
            if not budget or seq.status != SequenceStatus.RUNNING or len(out.scheduled) == max_seqs:
                break  # out of tokens, seq was preempted to make room for an older one, or the batch is full
            if seq.in_flight:
                continue  # its last step's token has not come back yet
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_new, out.preempted):
                short_of_blocks = True  # seq preempted itself, or the newest is in flight and cannot make room
                break
            self._run(seq, seq.num_computed_tokens, num_new, out)
            budget -= num_new
        # A step short of blocks for its running sequences has none to spare for newcomers.
        short_of_blocks = short_of_blocks or bool(out.preempted)
        while (self.waiting and budget and not short_of_blocks and len(self.running) < self.cfg.max_num_seqs
               and len(out.scheduled) < max_seqs):
            seq = self.waiting[0]
            chunk = self._first_chunk(seq, budget)
            if chunk is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._run(seq, *chunk, out)
            budget -= chunk[1]
        return out

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """Drops the request's unfinished sequences (only sample `index`, if given) and frees their blocks."""
        seqs = [s for s in (*self.waiting, *self.running)
                if s.request_id == request_id and (index is None or s.index == index)]
        for seq in seqs:
            (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
            self.block_manager.free(seq)
            seq.status, seq.finish_reason, seq.finished_time = SequenceStatus.FINISHED, "abort", time.monotonic()
        return seqs

    def _first_chunk(self, seq: Sequence, budget: int) -> tuple[int, int] | None:
        """(cached tokens, tokens to compute) if the waiting seq can be admitted now."""
        cached = self.block_manager.cached_prefix_len(seq)
        num_new = min(seq.num_tokens - cached, budget)
        if num_new < seq.num_tokens - cached and not self.cfg.enable_chunked_prefill:
            return None
        return (cached, num_new) if self.block_manager.can_allocate(seq, cached + num_new) else None

    def _run(self, seq: Sequence, start: int, num_new: int, out: SchedulerOutput) -> None:
        self.block_manager.allocate(seq, start + num_new)
        self.block_manager.mark_computed(seq, start + num_new)
        out.scheduled.append(ScheduledSeq(seq, num_new))

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Preempts the newest running sequences until seq's first num_tokens tokens fit; False if seq went, or if
        the newest is in flight (its blocks are being written: seq waits for a later step)."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            if self.running[-1].in_flight:
                return False
            victim = self.running.pop()
            self.block_manager.free(victim)
            victim.reset_for_recompute()
            self.waiting.appendleft(victim)
            preempted.append(victim)
            self.num_preemptions += 1
            if victim is seq:
                return False
        return True
