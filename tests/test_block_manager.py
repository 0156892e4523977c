import torch

from vlserve.engine.block_manager import BlockManager
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.sequence import MediaSpan, Sequence
from vlserve.media.item import MediaItem

BS = 16


def make_seq(tokens, media=()):
    spans = [MediaSpan(MediaItem("image", torch.zeros(4, 1), (1, 2, 2), h, merge_size=2), start, end) for h, start, end in media]
    return Sequence("r", list(tokens), SamplingParams(max_tokens=8), media=spans)


def admit(bm, seq, num_tokens=None):
    """Allocates the whole sequence and marks it scheduled, as the scheduler does for one full chunk."""
    num_tokens = num_tokens or seq.num_tokens
    assert bm.can_allocate(seq, num_tokens)
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens  # as the scheduler does
    bm.mark_computed(seq)


def test_ref_counts_and_free():
    bm = BlockManager(8, BS)
    a, b = make_seq(range(40)), make_seq(range(40))
    admit(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5 and bm.usage == 3 / 8
    admit(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert a.block_table == [] and [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.free(b)
    bm.assert_all_free()


def test_allocate_grows_the_table():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 1
    bm.allocate(seq, 16)
    assert len(seq.block_table) == 1
    bm.allocate(seq, 17)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6


def test_same_tokens_different_media_do_not_share():
    bm = BlockManager(16, BS)
    pads = [7] * 8
    tokens = list(range(4)) + pads + list(range(100, 140))
    admit(bm, make_seq(tokens, [("cat", 4, 12)]))
    assert bm.cached_prefix_len(make_seq(tokens, [("dog", 4, 12)])) == 0
    assert bm.cached_prefix_len(make_seq(tokens, [("cat", 4, 12)])) == 48
    assert bm.cached_prefix_len(make_seq(tokens)) == 0


def test_media_only_in_a_later_block_keeps_the_earlier_blocks():
    bm = BlockManager(16, BS)
    tokens = list(range(20)) + [7] * 8 + list(range(100, 130))
    admit(bm, make_seq(tokens, [("cat", 20, 28)]))
    assert bm.cached_prefix_len(make_seq(tokens, [("dog", 20, 28)])) == 16


def test_hashes_chain_over_earlier_blocks():
    bm = BlockManager(16, BS)
    admit(bm, make_seq(list(range(16)) + list(range(100, 133))))
    # Same second and third blocks after a different first block: nothing is shared.
    assert bm.cached_prefix_len(make_seq(list(range(50, 66)) + list(range(100, 133)))) == 0


def test_hit_only_once_the_filling_step_is_scheduled():
    bm = BlockManager(16, BS)
    a = make_seq(range(50))
    bm.allocate(a, 50)
    assert bm.cached_prefix_len(make_seq(range(50))) == 0
    a.num_computed_tokens = 20
    bm.mark_computed(a)  # the first chunk fills block 0 only
    b = make_seq(range(50))
    bm.allocate(b, 50)
    assert b.num_computed_tokens == b.num_cached_tokens == 16 and b.block_table[0] == a.block_table[0]
    a.num_computed_tokens = 50
    bm.mark_computed(a)
    assert bm.cached_prefix_len(make_seq(range(50))) == 48


def test_last_token_is_always_computed():
    bm = BlockManager(16, BS)
    admit(bm, make_seq(range(32)))
    seq = make_seq(range(32))
    bm.allocate(seq, 32)
    assert seq.num_computed_tokens == 16  # a full hit would leave no token to produce logits
    assert bm.cached_prefix_len(make_seq(range(33))) == 32


def test_stats_count_tokens():
    bm = BlockManager(16, BS)
    admit(bm, make_seq(range(40)))
    admit(bm, make_seq(range(40)))
    assert (bm.queries, bm.hits) == (80, 32)


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    admit(bm, make_seq(range(40)))
    seq = make_seq(range(40))
    admit(bm, seq)
    assert seq.num_cached_tokens == 0 and (bm.queries, bm.hits) == (0, 0) and not bm.cached


def test_freed_blocks_evicted_least_recently_freed_first():
    bm = BlockManager(9, BS)
    seqs = [make_seq(range(k * 100, k * 100 + 33)) for k in range(3)]  # 2 full blocks + 1 partial each
    for seq in seqs:
        admit(bm, seq)
    for seq in seqs:
        bm.free(seq)
    # The three partial blocks hold nothing findable and go first; then seq 0's blocks, tail before head.
    first_tail, first_head = seqs[0].block_hashes[1], seqs[0].block_hashes[0]
    head0 = bm.cached[first_head]
    grab = make_seq(range(1000, 1064))
    bm.allocate(grab, 64)
    assert first_tail not in bm.cached and first_head in bm.cached
    assert head0 not in grab.block_table
    assert bm.cached_prefix_len(make_seq(range(0, 33))) == 16
    assert bm.cached_prefix_len(make_seq(range(100, 133))) == 32
    assert bm.cached_prefix_len(make_seq(range(200, 233))) == 32


def test_hit_revives_a_free_block_and_shields_it_from_eviction():
    bm = BlockManager(4, BS)
    a = make_seq(range(33))
    admit(bm, a)
    a_blocks = a.block_table
    bm.free(a)
    b = make_seq(range(33))
    assert bm.can_allocate(b, 64)  # 2 revived + 2 fresh = the 4 free blocks
    assert not bm.can_allocate(b, 65)
    bm.allocate(b, 64)
    assert b.num_cached_tokens == 32 and b.block_table[:2] == a_blocks[:2]
    assert bm.num_free_blocks == 0 and sorted(b.block_table) == [0, 1, 2, 3]
    bm.free(b)
    bm.assert_all_free()


def test_hit_on_a_block_in_use_costs_no_free_block():
    bm = BlockManager(3, BS)
    a = make_seq(range(33))
    admit(bm, a)
    b = make_seq(range(33))
    assert bm.num_free_blocks == 0 and bm.can_allocate(b, 32) and not bm.can_allocate(b, 33)


def test_twin_blocks_computed_side_by_side():
    bm = BlockManager(8, BS)
    a, b = make_seq(range(20)), make_seq(range(20))
    bm.allocate(a, 20)
    bm.allocate(b, 20)  # admitted in the same step before a's blocks were marked: computes its own copy
    a.num_computed_tokens = b.num_computed_tokens = 20
    bm.mark_computed(a)
    bm.mark_computed(b)
    assert bm.cached[a.block_hashes[0]] == a.block_table[0] and bm.blocks[b.block_table[0]].hash is None
    bm.free(a)
    bm.free(b)
    bm.assert_all_free()
    assert bm.cached_prefix_len(make_seq(range(20))) == 16


def test_recompute_after_preemption_finds_its_generated_tokens():
    bm = BlockManager(8, BS)
    seq = make_seq(range(30))
    admit(bm, seq)
    seq.num_computed_tokens = 30
    for t in range(5):  # decode steps: token 30.. computed one per step
        seq.output_token_ids.append(500 + t)
        bm.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens += 1
        bm.mark_computed(seq)
    seq.output_token_ids.append(505)
    bm.free(seq)
    seq.reset_for_recompute()
    bm.allocate(seq, seq.num_tokens)
    assert seq.num_tokens == 36 and seq.num_computed_tokens == 32  # block 1 holds prompt and generated tokens


def test_a_block_waits_for_its_pending_token_to_become_findable():
    """Async scheduling: the step computing a block's last token is launched before that token (the step
    before's sample) reaches the host; the block is hashed, and findable, once it has."""
    bm = BlockManager(8, BS)
    seq = make_seq(range(BS - 1))
    admit(bm, seq)
    seq.num_pending_tokens = 1  # the prefill's sample, still on the device
    bm.allocate(seq, BS)
    seq.num_computed_tokens = BS  # the decode step that computes it is scheduled
    bm.mark_computed(seq)
    assert not bm.cached and seq.num_findable_blocks == 0
    seq.output_token_ids.append(77)
    seq.num_pending_tokens = 0
    bm.mark_computed(seq)
    assert bm.cached_prefix_len(make_seq([*range(BS - 1), 77, 5])) == BS
