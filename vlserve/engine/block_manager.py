"""Paged KV cache bookkeeping: which blocks each sequence holds, and the automatic prefix cache.

A full block is findable by a hash chained over every token before it and the media whose pad tokens it covers.
A block becomes findable once the step that fills it is scheduled and its tokens are known on the host (under
async scheduling the last one may still be on the device): the runner stores all of a step's KV before any
attention reads it, so a sequence admitted in that step or later may use it, while one admitted earlier looked it
up before it existed. Freed blocks keep their hash until the space is needed again.
"""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from vlserve.engine.sequence import Sequence


@dataclass
class Block:
    ref_count: int = 0
    hash: bytes | None = None  # set while the prefix cache maps this hash to this block


def block_hash(prev: bytes, token_ids: list[int], media_hashes: tuple[str, ...]) -> bytes:
    # A cryptographic hash: Python's hash() of ints is predictable, so a crafted prompt could collide with
    # another user's prefix and read its KV. Token bytes have a fixed width, so the fields cannot run together.
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    h.update("\0".join(media_hashes).encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block() for _ in range(num_blocks)]
        # Free blocks, next to be reused first: blocks holding nothing findable, then the least recently freed.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id; cached[h] == b exactly when blocks[b].hash == h
        self.queries = 0  # prefix cache tokens looked up, as vLLM counts them
        self.hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_ids) / len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix_len(self, seq: Sequence) -> int:
        """Tokens a sequence without blocks would find in the prefix cache now; changes no block."""
        return len(self._lookup(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `allocate(seq, num_tokens)` would find enough free blocks."""
        hits = [] if seq.block_table else self._lookup(seq)
        revived = sum(self.blocks[b].ref_count == 0 for b in hits)
        held = len(seq.block_table) + len(hits)
        return revived + max(0, self.blocks_for(num_tokens) - held) <= len(self.free_ids)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows the block table to cover the first `num_tokens` tokens. A sequence without blocks first takes the
        cached prefix, setting num_cached_tokens and num_computed_tokens past it."""
        if not seq.block_table:
            assert seq.num_computed_tokens == 0, "a sequence without blocks must recompute from its first token"
            hits = self._lookup(seq)
            for b in hits:
                self._share(b)
            seq.block_table, seq.num_findable_blocks = hits, len(hits)
            seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
            if self.enable_prefix_caching:
                self.queries += seq.num_tokens
                self.hits += seq.num_cached_tokens
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

    def mark_computed(self, seq: Sequence) -> None:
        """Makes findable the full blocks whose KV is computed or scheduled (num_computed_tokens) and whose tokens
        are known on the host (a pending token's block waits for it); call after scheduling and as tokens arrive."""
        if not self.enable_prefix_caching:
            return
        upto = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        for i in range(seq.num_findable_blocks, upto):
            h, b = self._hash(seq, i), seq.block_table[i]
            # A sequence admitted before the first copy became findable computes its own; the first stays findable.
            if h not in self.cached:
                self.cached[h] = b
                self.blocks[b].hash = h
        seq.num_findable_blocks = max(seq.num_findable_blocks, upto)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so they are evicted before the prefix they chain on.
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[b] = None
                if block.hash is None:
                    self.free_ids.move_to_end(b, last=False)
        seq.block_table, seq.num_findable_blocks = [], 0

    def assert_all_free(self) -> None:
        leaked = [b for b, block in enumerate(self.blocks) if block.ref_count]
        assert not leaked and len(self.free_ids) == len(self.blocks), f"blocks still referenced: {leaked}"

    def _lookup(self, seq: Sequence) -> list[int]:
        """Longest run of cached full blocks, leaving the last token to compute so the model yields its logits. None
        for a sequence that owes prompt logprobs: they need the logits of every prompt token."""
        hits = []
        if self.enable_prefix_caching and not seq.owes_prompt_logprobs:
            for i in range((seq.num_tokens - 1) // self.block_size):
                b = self.cached.get(self._hash(seq, i))
                if b is None:
                    break
                hits.append(b)
        return hits

    def _hash(self, seq: Sequence, i: int) -> bytes:
        """Hash of the sequence's full block i, computed once and kept on the sequence."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) <= i:
            start, end = len(hashes) * size, (len(hashes) + 1) * size
            hashes.append(block_hash(hashes[-1] if hashes else b"", seq.tokens(start, end),
                                     seq.media_hashes_in(start, end)))
        return hashes[i]

    def _share(self, b: int) -> None:
        if self.blocks[b].ref_count == 0:
            del self.free_ids[b]
        self.blocks[b].ref_count += 1

    def _take_free(self) -> int:
        assert self.free_ids, "out of KV blocks: ask can_allocate before allocate"
        b, _ = self.free_ids.popitem(last=False)
        block = self.blocks[b]
        if block.hash is not None:
            del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return b
