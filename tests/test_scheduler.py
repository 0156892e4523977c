import random
from collections import deque

import numpy as np
import pytest
import torch

from vlserve.config import SchedulerConfig
from vlserve.engine.block_manager import BlockManager
from vlserve.engine.input_batch import InputBatch
from vlserve.engine.request import Capacity
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.scheduler import Scheduler
from vlserve.engine.sequence import MediaSpan, Sequence, SequenceStatus
from vlserve.errors import InvalidRequestError
from vlserve.inputs.checks import check_fits
from vlserve.media.item import MediaItem

BS = 16


def make_seq(tokens, max_tokens=4, request_id="r", media=()):
    """media: (content hash, first pad, end) of each image, its media tokens the pads between."""
    spans = [MediaSpan(MediaItem("image", torch.zeros(4, 1), (1, 2, 2 * (end - start)), h, merge_size=2), start, end)
             for h, start, end in media]
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(request_id, list(tokens), params, media=spans, max_tokens=max_tokens)


def make_scheduler(num_blocks=64, chunked=True, prefix=True, **cfg):
    cfg = SchedulerConfig(enable_chunked_prefill=chunked, **{"max_model_len": 1024, **cfg})
    return Scheduler(cfg, BlockManager(num_blocks, BS, prefix))


class FakeModel:
    """Plays the engine after each step, and checks every KV slot a sequence reads holds what it should.

    The KV of token j stands for everything the model saw up to j: its tokens and media. Each step first writes the
    new tokens' KV, then checks all tokens each scheduled sequence attends to, as the runner does. A sampled token
    is known at once on the "device" and reaches the host (`token_arrived`) `lag` steps later, as under async
    scheduling (lag 1); a token from `stop_tokens` ends its sequence when it arrives.
    """

    def __init__(self, sched, lag=0, stop_tokens=()):
        self.sched, self.kv, self.steps, self.lag, self.stop_tokens = sched, {}, 0, lag, set(stop_tokens)
        self.order = []  # sequences in order of first admission
        self.pending = {}  # seq -> tokens sampled on the "device", not yet on the host
        self.launched = deque()  # (scheduled, [(seq, token)]) of steps in flight
        self.batch = InputBatch(sched.cfg.max_num_seqs, -(-sched.cfg.max_model_len // BS), BS)  # the runner's
        take_free = sched.block_manager._take_free

        def take_garbage():  # a reused block holds stale KV until written again
            b = take_free()
            for j in range(b * BS, (b + 1) * BS):
                self.kv.pop(j, None)
            return b

        sched.block_manager._take_free = take_garbage

    def step(self):
        out = self.sched.schedule()
        cfg = self.sched.cfg
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens and len(out.scheduled) <= cfg.max_num_seqs
        assert not {s.seq for s in out.scheduled} & set(out.preempted)
        for s in out.scheduled:
            seq = s.seq
            if seq not in self.order:
                self.order.append(seq)
            assert s.num_new_tokens >= 1 and seq.status == SequenceStatus.RUNNING
            assert seq.num_computed_tokens == s.end  # a sample is pending from here: the chunk reached the end
            assert s.end == seq.num_tokens_with_pending - 1 if s.samples else s.end < seq.num_tokens_with_pending
            for j in range(s.start, s.end):
                self.kv[self.slot(seq, j)] = self.content(seq, j)
        for s in out.scheduled:
            for j in range(s.end):
                assert self.kv.get(self.slot(s.seq, j)) == self.content(s.seq, j), (s.seq.request_id, j)
        if out.scheduled:  # as EngineCore.step: an empty step never reaches the runner
            self.check_batch(out)
        samples = []
        for s in out.scheduled:
            s.seq.in_flight += 1
            if s.samples:
                token = 1000 + (s.seq.seq_id * 7 + s.end) % 50
                self.pending.setdefault(s.seq, []).append(token)
                samples.append((s.seq, token))
        if out.scheduled:
            self.launched.append((out.scheduled, samples))
        if len(self.launched) > self.lag or not out.scheduled and self.launched:  # as EngineCore.step
            self.complete(*self.launched.popleft())
        self.steps += 1
        return out

    def check_batch(self, out):
        """The runner's persistent batch, updated by the step's diff, gives every sequence's table and slots."""
        seats = self.batch.update(out.departed, out.scheduled)
        assert len(set(seats.tolist())) == len(seats)
        starts = np.array([s.start for s in out.scheduled], dtype=np.int64)
        lengths = np.array([s.num_new_tokens for s in out.scheduled], dtype=np.int64)
        slots, positions = self.batch.slots(seats, starts, lengths)
        assert slots.tolist() == [self.slot(s.seq, j) for s in out.scheduled for j in range(s.start, s.end)]
        assert positions.tolist() == [j for s in out.scheduled for j in range(s.start, s.end)]
        for row, s in zip(self.batch.step_tables(seats), out.scheduled):
            assert row[:len(s.seq.block_table)].tolist() == s.seq.block_table

    def complete(self, scheduled, samples):
        for s in scheduled:
            s.seq.in_flight -= 1
        for seq, token in samples:
            assert self.pending[seq].pop(0) == token
            if seq.is_finished:
                continue  # stopped by the step before: this token is dropped
            self.sched.token_arrived(seq, token)
            if len(seq.output_token_ids) == seq.max_tokens or token in self.stop_tokens:
                seq.status = SequenceStatus.FINISHED
                self.sched.finish(seq)

    def tokens(self, seq):
        return seq.token_ids + self.pending.get(seq, [])

    def slot(self, seq, j):
        return seq.block_table[j // BS] * BS + j % BS

    def content(self, seq, j):
        return (tuple(self.tokens(seq)[:j + 1]), seq.media_hashes_in(0, j + 1))


def run_all(sched, model, max_steps=10_000):
    while sched.has_unfinished() or model.launched:
        model.step()
        assert model.steps < max_steps, "the scheduler stopped making progress"


def test_decode_step_is_one_token_each():
    sched = make_scheduler()
    seqs = [make_seq(range(i * 100, i * 100 + 10)) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    model = FakeModel(sched)
    assert [s.num_new_tokens for s in model.step().scheduled] == [10, 10, 10]
    assert [s.num_new_tokens for s in model.step().scheduled] == [1, 1, 1]


def test_chunked_prefill_runs_beside_decodes():
    sched = make_scheduler(max_num_batched_tokens=32)
    short = [make_seq(range(i * 100, i * 100 + 5), max_tokens=20) for i in range(2)]
    for seq in short:
        sched.add(seq)
    model = FakeModel(sched)
    model.step()
    long = make_seq(range(500, 600), max_tokens=2)
    sched.add(long)
    chunks = []
    while long.in_prefill or not long.output_token_ids:
        out = model.step()
        assert [s.seq for s in out.scheduled] == [*short, long]
        assert [s.num_new_tokens for s in out.scheduled[:2]] == [1, 1]
        chunks.append(out.scheduled[2].num_new_tokens)
    assert chunks == [30, 30, 30, 10] and long.num_computed_tokens == 100


def test_prompt_not_split_without_chunked_prefill():
    sched = make_scheduler(num_blocks=128, chunked=False, max_num_batched_tokens=1024)
    first, big, small = make_seq(range(600)), make_seq(range(1000, 1500)), make_seq(range(2000, 2010))
    for seq in (first, big, small):
        sched.add(seq)
    model = FakeModel(sched)
    assert [s.seq for s in model.step().scheduled] == [first]  # big waits for a step with room; small queues behind
    assert [(s.seq, s.num_new_tokens) for s in model.step().scheduled] == [(first, 1), (big, 500), (small, 10)]


def image_seq(request_id: str, before: int, image: int, after: int = 2, tag: str = "img", max_tokens: int = 4):
    """`before` text tokens, an image of `image` media tokens, `after` text tokens."""
    base = 100 * len(request_id)
    tokens = [base + i for i in range(before)] + [7] * image + [base + 50 + i for i in range(after)]
    return make_seq(tokens, max_tokens, request_id, [(f"{tag}-{request_id}", before, before + image)])


def test_encoder_budget_holds_an_image_for_a_later_step():
    """Two 80-token images under a budget of 100: the second request's text runs, its image waits a step, while
    the first keeps decoding."""
    sched = make_scheduler(max_num_encoder_tokens=100)
    a, b = image_seq("a", 10, 80), image_seq("bb", 10, 80)
    for seq in (a, b):
        sched.add(seq)
    model = FakeModel(sched)
    assert [(s.seq, s.num_new_tokens) for s in model.step().scheduled] == [(a, 92), (b, 10)]
    assert [(s.seq, s.num_new_tokens) for s in model.step().scheduled] == [(a, 1), (b, 82)]
    assert sched.encoder_left == 20


def test_a_larger_image_runs_alone_and_text_is_never_held():
    sched = make_scheduler(max_num_encoder_tokens=50)
    big, text, small = image_seq("a", 4, 120), make_seq(range(300, 320), request_id="t"), image_seq("cc", 4, 10)
    for seq in (big, text, small):
        sched.add(seq)
    model = FakeModel(sched)
    # the untouched budget takes the 120-token image; text-only prompts pass; the small image waits
    assert [(s.seq, s.num_new_tokens) for s in model.step().scheduled] == [(big, 126), (text, 20), (small, 4)]
    assert [(s.seq, s.num_new_tokens) for s in model.step().scheduled] == [(big, 1), (text, 1), (small, 12)]


def test_encoder_budget_without_chunked_prefill_admits_whole_prompts():
    sched = make_scheduler(chunked=False, max_num_batched_tokens=1024, max_num_encoder_tokens=50)
    two = make_seq(list(range(4)) + [7] * 60 + [8, 9], 4, "a", [("x", 4, 34), ("y", 34, 64)])
    other = image_seq("bb", 4, 10)
    for seq in (two, other):
        sched.add(seq)
    model = FakeModel(sched)
    assert [s.seq for s in model.step().scheduled] == [two]  # 60 media tokens at once; the next prompt waits whole
    assert [(s.seq, s.num_new_tokens) for s in model.step().scheduled] == [(two, 1), (other, 16)]


def test_images_in_the_vision_cache_or_already_in_the_step_cost_nothing():
    """The same picture in two requests is encoded once a step; one the runner's vision cache holds, never."""
    cfg = SchedulerConfig(max_model_len=1024, max_num_encoder_tokens=100)
    sched = Scheduler(cfg, BlockManager(64, BS, False), encoded=lambda content_hash: content_hash == "img-cached")
    a, b, cached, c = (image_seq("a", 4, 80, tag="same"), image_seq("b", 4, 80, tag="same"),
                       image_seq("cached", 4, 80), image_seq("cc", 4, 80))
    b.media[0].item = a.media[0].item  # one picture: one content hash
    for seq in (a, b, cached, c):
        sched.add(seq)
    model = FakeModel(sched)
    assert [(s.seq, s.num_new_tokens) for s in model.step().scheduled] == [(a, 86), (b, 86), (cached, 86), (c, 4)]
    assert sched.encoder_left == 20


def test_a_cached_prefix_ending_inside_an_image_charges_the_image():
    """The rows after the cached blocks need the whole image's embeddings again."""
    sched = make_scheduler(max_num_encoder_tokens=100)
    first = image_seq("a", 10, 30, tag="same")
    sched.add(first)
    model = FakeModel(sched)
    while not first.is_finished:
        model.step()
    again = image_seq("a", 10, 30, tag="same")
    sched.add(again)
    (chunk,) = model.step().scheduled
    assert chunk.start == 32 and sched.encoder_left == 70  # 2 blocks cached, the image (pads 10-40) re-encoded


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=3)
    for i in range(10):
        sched.add(make_seq(range(i * 100, i * 100 + 8), max_tokens=5))
    model = FakeModel(sched)
    out = model.step()
    assert len(out.scheduled) == 3 and sched.num_running == 3 and sched.num_waiting == 7
    run_all(sched, model)
    sched.block_manager.assert_all_free()


def test_same_prompt_admitted_in_one_step_shares_blocks():
    sched = make_scheduler()
    a, b = make_seq(range(40)), make_seq(range(40))
    sched.add(a)
    sched.add(b)
    out = FakeModel(sched).step()
    assert [s.num_new_tokens for s in out.scheduled] == [40, 8]
    assert b.num_cached_tokens == 32 and b.block_table[:2] == a.block_table[:2]


def test_preempts_the_newest_and_requeues_it_at_the_front():
    # 6 blocks: two 40-token prompts take 3 each; the first decode past 48 tokens needs a 4th.
    sched = make_scheduler(num_blocks=6, prefix=False)
    old, new, later = make_seq(range(40), 20), make_seq(range(100, 140), 20), make_seq(range(200, 210), 2)
    for seq in (old, new, later):
        sched.add(seq)
    model = FakeModel(sched)
    preempted = []
    while not preempted:
        preempted = model.step().preempted
    assert preempted == [new] and new.status == SequenceStatus.WAITING and new.block_table == []
    assert list(sched.waiting) == [new, later] and new.num_preemptions == 1 and old.num_preemptions == 0
    run_all(sched, model)
    assert all(s.is_finished and len(s.output_token_ids) == s.max_tokens for s in (old, new, later))
    sched.block_manager.assert_all_free()


def test_newest_running_preempts_itself():
    sched = make_scheduler(num_blocks=4, prefix=False)
    old, new = make_seq(range(32), 10), make_seq(range(100, 132), 10)
    sched.add(old)
    sched.add(new)
    model = FakeModel(sched)
    model.step()  # each fills 2 blocks; old's first decode needs a third, so new must go
    out = model.step()
    assert [s.seq for s in out.scheduled] == [old] and out.preempted == [new]
    run_all(sched, model)
    sched.block_manager.assert_all_free()


def test_abort_frees_waiting_and_running():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(range(i * 100, i * 100 + 20), request_id=f"r{i // 2}") for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    FakeModel(sched).step()
    assert sched.abort("r0") == seqs[:2] and sched.abort("r1") == seqs[2:]
    assert all(s.status == SequenceStatus.FINISHED and s.finish_reason == "abort" for s in seqs)
    assert not sched.has_unfinished() and sched.abort("r0") == []
    sched.block_manager.assert_all_free()


def test_refuses_what_can_never_fit_the_cache():
    """The input processor's rule (the scheduler trusts it): a sequence that could never run to the end alone."""
    capacity = Capacity(max_model_len=1024, num_kv_blocks=4, block_size=16)
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks of 16 tokens, but the cache holds 4"):
        check_fits(60, 10, capacity)
    check_fits(60, 5, capacity)  # 64 tokens, the last never computed: 4 blocks


@pytest.mark.parametrize("chunked,prefix,lag", [(True, True, 0), (True, False, 0), (False, True, 0),
                                                (True, True, 1), (False, False, 1)])
def test_random_load_finishes_everything(chunked, prefix, lag):
    """lag 1: async scheduling, tokens arrive a step late; sequences also stop on tokens, mid-flight."""
    rng = random.Random(f"{chunked}{prefix}{lag}")
    budget = 64 if chunked else 256
    sched = make_scheduler(num_blocks=40, chunked=chunked, prefix=prefix, max_num_seqs=8,
                           max_num_batched_tokens=budget, max_model_len=256, async_scheduling=bool(lag),
                           max_num_encoder_tokens=20)  # one image of 16 media tokens a step
    system = list(range(3000, 3040))  # a shared system prompt, then one of two images with identical pad tokens
    stop = {1000 + k for k in range(0, 50, 17)} if lag else set()
    model, added = FakeModel(sched, lag, stop), []
    while len(added) < 150 or sched.has_unfinished() or model.launched:
        for _ in range(rng.choice([0, 0, 1, 2]) if len(added) < 150 else 0):
            suffix = [rng.randrange(2000) for _ in range(rng.randrange(1, 150))]
            media = [(rng.choice(["cat", "dog"]), 40, 56)] if rng.random() < 0.5 else []
            seq = make_seq(system + [7] * 16 + suffix, rng.randrange(1, 40), f"r{len(added)}", media)
            sched.add(seq)
            added.append(seq)
        model.step()
        assert model.steps < 20_000, "the scheduler stopped making progress"
    assert all(s.is_finished and (len(s.output_token_ids) == s.max_tokens or s.output_token_ids[-1] in stop)
               for s in added)
    assert any(len(s.output_token_ids) < s.max_tokens for s in added) == bool(stop)
    assert model.order == added  # first admissions in arrival order: nobody overtakes an older request
    assert sum(s.num_preemptions for s in added) > 0
    assert (sched.block_manager.hits > 0) == prefix
    sched.block_manager.assert_all_free()


def test_sequences_in_flight_are_skipped_and_never_preempted():
    """Pipeline parallel: a sequence whose step is still in the pipeline is neither scheduled again nor preempted
    (its blocks are being written); the step makes do with the others, or waits."""
    sched = make_scheduler(num_blocks=4)
    old, new = make_seq(range(BS * 2), 100, "old"), make_seq(range(100, 100 + BS), 100, "new")
    for seq in (old, new):
        sched.add(seq)
    assert [s.seq for s in sched.schedule().scheduled] == [old, new]  # 3 of 4 blocks
    for s in (old, new):
        s.num_pending_tokens = 0
        s.output_token_ids.append(7)  # each now needs one more block for its first output token
    new.in_flight = True
    out = sched.schedule()  # old needs a block: one is free
    assert [s.seq for s in out.scheduled] == [old] and not out.preempted
    old.num_pending_tokens = 0
    old.output_token_ids.extend([7] * (BS + 1))  # old needs a 4th block, none free; only `new` could give one
    old.num_computed_tokens = old.num_tokens - 1
    sched.block_manager.mark_computed(old)
    out = sched.schedule()
    assert out.scheduled == [] and out.preempted == [] and new.status == SequenceStatus.RUNNING
    new.in_flight = False
    out = sched.schedule()  # now the newest may go
    assert out.preempted == [new] and [s.seq for s in out.scheduled] == [old]


def test_batches_can_be_capped_below_the_seats():
    sched = make_scheduler()
    seqs = [make_seq(range(i, i + 5), request_id=str(i)) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    first = sched.schedule(max_seqs=3)
    assert [s.seq for s in first.scheduled] == seqs[:3]
    for s in first.scheduled:
        s.seq.in_flight = True
    assert [s.seq for s in sched.schedule(max_seqs=3).scheduled] == seqs[3:]  # the rest, admitted


def test_departures_reach_the_runner_with_the_next_step_it_runs():
    """Under async scheduling a schedule can be empty (every sequence waits for its token or ends); the sequences
    that left meanwhile are reported with the next step that runs, so their seats are freed (no leak over many
    rounds) and a sequence preempted then readmitted gets a fresh table (not its stale one: its KV would go to
    blocks it no longer owns)."""
    sched = make_scheduler(num_blocks=4, prefix=False, max_num_seqs=4, async_scheduling=True)
    model = FakeModel(sched, lag=1)
    sched.add(make_seq(range(16), max_tokens=2, request_id="A"))
    sched.add(make_seq(range(100, 131), max_tokens=10, request_id="B"))
    run_all(sched, model)
    assert model.sched.block_manager.num_free_blocks == 4
    for round_ in range(8):  # two requests a round, on 4 seats
        sched.add(make_seq(range(round_, round_ + 5), max_tokens=3, request_id=f"x{round_}"))
        sched.add(make_seq(range(round_ + 50, round_ + 57), max_tokens=4, request_id=f"y{round_}"))
        run_all(sched, model)
