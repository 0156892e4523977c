"""Continuous batching: each step, which sequences compute how many tokens, within token, seat and KV budgets.

Strict first-come first-served: running sequences go first, oldest first; then waiting ones are admitted from the
head of the queue until one does not fit, so no request is overtaken. When KV blocks run out, the newest running
sequence is preempted (its KV dropped, recomputed later from its tokens) and requeued at the front.

Contract with the engine: a scheduled sequence computes tokens [start, start + num_new_tokens); `schedule` has
already advanced num_computed_tokens past them and made their full blocks findable in the prefix cache. A chunk
that reaches the sequence's last token samples one: `schedule` counts it in num_pending_tokens until the engine
appends it (`token_arrived`) and calls `finish` on each sequence that is done. `abort` and `finish` run between
steps.

The encoder budget (--max-num-encoder-tokens): a chunk whose pads begin a media item the step cannot encode within
the budget's remaining media tokens stops before that item (its text before it still runs); the item waits for a
later step. An item is encoded in the step of its first pad (a Qwen3-VL video: its first frame's span), or in a
sequence's first chunk when a cached prefix ends inside it; its later chunks cost nothing, and so does an item the
runner's vision cache holds or the step already encodes for another sequence. A step that has encoded nothing yet
takes one item of any size, so none waits forever. Running sequences' chunks are charged first, in their order,
then newcomers'. Without chunked prefill a prompt's items go together or wait.

A sequence whose step is not back yet is `in_flight`. Under async scheduling (one stream: steps run in the order
they are launched) it is scheduled again at once, its pending token read on the device, and may be preempted: a
later step's writes to its freed blocks come after the earlier step's. Under pipeline parallel (stages in several
processes) it is skipped, and never preempted; so is a sequence with a grammar under async scheduling (structured
output: its next token mask needs its last token on the host).
"""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vlserve.config import SchedulerConfig
from vlserve.engine.block_manager import BlockManager
from vlserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # the first token computed this step
    num_new_tokens: int  # computed this step
    samples: bool  # the chunk reaches the last token: the step samples the next one
    prompt_positions: range = range(0)  # prompt positions whose logprobs the chunk's logits give (prompt_logprobs)

    @property
    def logit_rows(self) -> int:
        return self.samples + len(self.prompt_positions)

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # back in the waiting queue, KV dropped
    # seq_ids that left the running set since the last schedule (finished, aborted, preempted): the runner's
    # persistent batch frees their seats
    departed: list[int] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager,
                 encoded: Callable[[str], bool] = lambda content_hash: False):
        """`encoded`: whether the runner's vision cache holds an item's embeddings (then it costs no budget)."""
        self.cfg = cfg
        self.block_manager = block_manager
        self.encoded = encoded
        self.waiting: deque[Sequence] = deque()
        # Oldest first. Appending on admission keeps that order: a preempted sequence was the newest running one
        # and returns at the head of the queue, so nothing newer can be admitted before it.
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total, for metrics
        self.departed: list[int] = []  # reported by the next schedule
        self.rows_left = cfg.max_num_seqs  # logits rows the step being scheduled may still compute
        self.encoder_left = cfg.max_num_encoder_tokens  # media tokens it may still encode (None: no limit)
        self.encoding: set[str] = set()  # content hashes the step being scheduled encodes

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
        self.encoder_left, self.encoding = self.cfg.max_num_encoder_tokens, set()
        max_seqs = max_seqs or self.cfg.max_num_seqs
        # Logits rows: one a sampling sequence, one a prompt logprob; at most --max-num-seqs, as memory was sized
        self.rows_left = self.cfg.max_num_seqs
        for seq in list(self.running):  # a copy: making room may preempt the newest
            if not budget or seq.status != SequenceStatus.RUNNING or len(out.scheduled) == max_seqs:
                break  # out of tokens, seq was preempted to make room for an older one, or the batch is full
            if seq.in_flight and (not self.cfg.async_scheduling or seq.grammar is not None):
                continue  # its last step's token has not come back yet (a grammar's next mask needs it)
            if self._done_after_pending(seq):
                continue  # its pending token is its last: nothing more to compute
            num_new = self._rows_cap(seq, min(seq.num_tokens_with_pending - seq.num_computed_tokens, budget))
            num_new = self._encoder_cap(seq, seq.num_computed_tokens, num_new)
            if not num_new:
                continue  # its prompt logprobs' rows, or its next image, do not fit this step
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
            self._run(seq, *chunk, out, first=True)
            budget -= chunk[1]
        if out.scheduled:  # the runner hears of departures with the next step it runs (an empty one is not run)
            out.departed, self.departed = self.departed, []
        return out

    def token_arrived(self, seq: Sequence, token: int) -> None:
        """A pending token reached the host (a preempted sequence keeps it: it was sampled from a full context)."""
        seq.num_pending_tokens -= 1
        seq.output_token_ids.append(token)
        if seq.block_table:
            self.block_manager.mark_computed(seq)  # the token may complete a block whose KV is being computed

    def finish(self, seq: Sequence) -> None:
        """Retires a running sequence, or one preempted while its last token was in flight."""
        (self.running if seq in self.running else self.waiting).remove(seq)
        self.block_manager.free(seq)
        self.departed.append(seq.seq_id)

    def abort(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """Drops the request's unfinished sequences (only sample `index`, if given) and frees their blocks."""
        seqs = [s for s in (*self.waiting, *self.running)
                if s.request_id == request_id and (index is None or s.index == index)]
        for seq in seqs:
            (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
            self.block_manager.free(seq)
            self.departed.append(seq.seq_id)
            seq.status, seq.finish_reason, seq.finished_time = SequenceStatus.FINISHED, "abort", time.monotonic()
        return seqs

    def _done_after_pending(self, seq: Sequence) -> bool:
        """Its pending token reaches max_tokens or max_model_len: the engine will stop it whatever the token."""
        return seq.num_pending_tokens > 0 and (seq.num_outputs_with_pending >= seq.max_tokens or
                                              seq.num_tokens_with_pending >= self.cfg.max_model_len)

    def _first_chunk(self, seq: Sequence, budget: int) -> tuple[int, int] | None:
        """(cached tokens, tokens to compute) if the waiting seq can be admitted now."""
        if seq.num_pending_tokens:
            return None  # preempted while its last token was in flight: it recomputes once the token is here
        cached = self.block_manager.cached_prefix_len(seq)
        num_new = self._encoder_cap(seq, cached, self._rows_cap(seq, min(seq.num_tokens - cached, budget)), True)
        if not num_new:
            return None
        if num_new < seq.num_tokens - cached and not self.cfg.enable_chunked_prefill:
            return None
        return (cached, num_new) if self.block_manager.can_allocate(seq, cached + num_new) else None

    def _rows_cap(self, seq: Sequence, num_new: int) -> int:
        """num_new, cut so a chunk owing prompt logprobs keeps its logits rows (and maybe a sample's) within the
        step's; 0 when none are left. Chunked prefill is on: the input processor refuses the case without it."""
        return min(num_new, max(0, self.rows_left - 1)) if seq.owes_prompt_logprobs else num_new

    def _encoder_cap(self, seq: Sequence, start: int, num_new: int, first: bool = False) -> int:
        """num_new, cut before the first media item the chunk would encode that the step's encoder budget cannot
        take (see the module docstring); 0 when the whole prompt must run at once (no chunked prefill) and its
        items do not fit. `first`: the sequence's first chunk (after any cached prefix)."""
        left = self.encoder_left
        if left is None:
            return num_new
        items = list(self._items_encoded(seq, start, start + num_new, first).values())
        if not self.cfg.enable_chunked_prefill:
            items = [(start, sum(cost for _, cost in items))] if items else []
        for at, cost in items:
            if cost > left and left < self.cfg.max_num_encoder_tokens:
                return at - start  # the item waits (a budget untouched takes one item of any size)
            left -= cost
        return num_new

    def _items_encoded(self, seq: Sequence, start: int, end: int, first: bool) -> dict[str, tuple[int, int]]:
        """content hash -> (first pad in the chunk, media tokens) of each item the chunk [start, end) encodes: those
        whose first pad lies in it and, in a first chunk, one a cached prefix cut through (its rows are needed
        again); not those in the vision cache or already encoded by the step."""
        items = {}
        for span in seq.media:
            if span.start < end and start < span.end and (first or span.offset == 0 and span.start >= start):
                key = span.content_hash
                if key not in self.encoding and not self.encoded(key):
                    items.setdefault(key, (max(start, span.start), span.item.num_tokens))
        return items

    def _run(self, seq: Sequence, start: int, num_new: int, out: SchedulerOutput, first: bool = False) -> None:
        if self.encoder_left is not None:
            items = self._items_encoded(seq, start, start + num_new, first)
            self.encoder_left -= sum(cost for _, cost in items.values())
            self.encoding.update(items)
        self.block_manager.allocate(seq, start + num_new)
        seq.num_computed_tokens = start + num_new
        self.block_manager.mark_computed(seq)
        samples = seq.num_computed_tokens == seq.num_tokens_with_pending
        seq.num_pending_tokens += samples
        scored = seq.prompt_logprob_positions(start, start + num_new)
        seq.prompt_logprobs_next = max(seq.prompt_logprobs_next, scored.stop)
        item = ScheduledSeq(seq, start, num_new, samples, scored)
        self.rows_left -= item.logit_rows
        out.scheduled.append(item)

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Preempts the newest running sequences until seq's first num_tokens tokens fit; False if seq went, or if
        the newest is in flight (its blocks are being written: seq waits for a later step)."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            if self.running[-1].in_flight and not self.cfg.async_scheduling:
                return False
            victim = self.running.pop()
            self.block_manager.free(victim)
            self.departed.append(victim.seq_id)
            victim.reset_for_recompute()
            self.waiting.appendleft(victim)
            preempted.append(victim)
            self.num_preemptions += 1
            if victim is seq:
                return False
        return True
