"""CUDA graphs for decode steps (one new token per sequence, no media): a forward pass captured per batch size,
replayed after the step is copied into static input buffers. A batch runs in the smallest captured size that holds
it; its padding rows write their KV to a spare block that no sequence owns and are never sampled."""

from dataclasses import dataclass

import torch
from torch import nn

from vlserve.model.layers.attention import AttentionMetadata
from vlserve.transfer import to_device

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # a subset of vLLM's, to keep capture short


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The sizes up to --max-num-seqs (at most 256), which closes the range so every batch up to it has a graph."""
    cap = min(max_num_seqs, CAPTURE_SIZES[-1])
    return [s for s in CAPTURE_SIZES if s < cap] + [cap]


def bucket(sizes: list[int], batch: int) -> int | None:
    """The smallest captured size that holds `batch`; None when none does (the step runs eagerly)."""
    return min((s for s in sizes if s >= batch), default=None)


@dataclass
class DecodeInputs:
    """A decode step's inputs padded to a captured size (CPU tensors, copied into the graph's buffers)."""

    input_ids: torch.Tensor  # (size,)
    positions: torch.Tensor  # (size,): pos + rope_delta
    slot_mapping: torch.Tensor  # (size,)
    context_lens: torch.Tensor  # (size,)
    block_tables: torch.Tensor  # (size, the step's widest table)


def pad_decode(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int,
               spare_block: int, block_size: int) -> DecodeInputs:
    """Padding rows: token 0 at position 0, a one-token context in the spare block, where their KV goes too."""
    pad = size - len(input_ids)

    def extend(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])

    tables = extend(meta.block_tables, 0)
    tables[len(input_ids):, 0] = spare_block
    return DecodeInputs(extend(input_ids, 0), extend(positions, 0), extend(meta.slot_mapping, spare_block * block_size),
                        extend(meta.context_lens, 1), tables)


class DecodeGraphs:
    """Graphs of `model` over static buffers for every size in `sizes`, sharing one memory pool."""

    def __init__(self, model: nn.Module, sizes: list[int], max_model_len: int, block_size: int, spare_block: int,
                 device: torch.device):
        self.model, self.sizes = model, sorted(sizes)
        self.max_model_len, self.block_size, self.spare_block = max_model_len, block_size, spare_block
        n, max_blocks = self.sizes[-1], -(-max_model_len // block_size)
        # Until the first replay every row is padding, so warm-up runs touch only the spare block.
        self.buffers = DecodeInputs(
            torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device),
            torch.full((n,), spare_block * block_size, dtype=torch.long, device=device),
            torch.ones(n, dtype=torch.int32, device=device),
            torch.full((n, max_blocks), spare_block, dtype=torch.int32, device=device))
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def forward(self, size: int) -> torch.Tensor:
        b = self.buffers
        # max_context_len is only an upper bound here: it fixes paged_decode's split count for this size.
        meta = AttentionMetadata(self.cu_seqlens[:size + 1], 1, b.context_lens[:size], b.block_tables[:size],
                                 b.slot_mapping[:size], max_context_len=self.max_model_len, has_prefix=True)
        return self.model(b.input_ids[:size], b.positions[:size], meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so the smaller graphs reuse the pool's memory."""
        pool = None
        for size in reversed(self.sizes):
            self.forward(size)  # compiles the Triton kernels for this size before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def covers(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
               pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states (size, hidden) of a decode step (CPU inputs; `pending`: (rows, token ids) on the
        device that replace those rows' input ids); rows past the batch are padding. The tensor is the graph's
        output buffer: read it before the next replay."""
        size = bucket(self.sizes, len(input_ids))
        padded = pad_decode(input_ids, positions, meta, size, self.spare_block, self.block_size)
        b = self.buffers
        b.input_ids[:size].copy_(to_device(padded.input_ids, b.input_ids.device), non_blocking=True)
        b.positions[:size].copy_(to_device(padded.positions, b.input_ids.device), non_blocking=True)
        b.slot_mapping[:size].copy_(to_device(padded.slot_mapping, b.input_ids.device), non_blocking=True)
        b.context_lens[:size].copy_(to_device(padded.context_lens, b.input_ids.device), non_blocking=True)
        b.block_tables[:size, :padded.block_tables.shape[1]].copy_(
            to_device(padded.block_tables, b.input_ids.device), non_blocking=True)
        if pending is not None:
            b.input_ids[pending[0]] = pending[1]
        self.graphs[size].replay()
        return self.outputs[size]
