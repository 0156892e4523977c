"""Attention dispatch: fresh sequences attend within the batch; engine steps go through the paged KV cache.

On CUDA, fresh tokens go through torch's flash varlen attention (Triton where flash is missing: fp32, cards
before sm_80) and the paged cache through our Triton kernels; on the CPU, the plain-torch references. Triton is
imported only on the CUDA path.
"""

import functools
import inspect
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from vlserve.kernels.kv_store import store_kv_ref
from vlserve.kernels.paged_attention import paged_attention_ref, varlen_attention_ref
from vlserve.transfer import to_device


@dataclass
class AttentionMetadata:
    """How the flattened new tokens of one forward pass split into sequences, and where their KV lives. Built on
    the CPU; `to(device)` moves it once per step. The host-side maxima pick the kernel, so a forward pass never
    waits on the device to read them."""

    cu_seqlens: torch.Tensor  # (B + 1,) int32: boundaries of each sequence's new tokens in the flat batch
    max_seqlen: int  # most new tokens of any sequence
    # Paged KV cache (None: no cache, every sequence is entirely new and attends only to itself)
    context_lens: torch.Tensor | None = None  # (B,) int32: cached + new tokens per sequence
    block_tables: torch.Tensor | None = None  # (B, most blocks) int32: each sequence's KV blocks in order, 0-padded
    slot_mapping: torch.Tensor | None = None  # (T,) int64: flat cache slot of each new token
    max_context_len: int = 0
    has_prefix: bool = False  # some sequence also attends to keys of earlier steps (or of a shared prefix)

    @classmethod
    def from_lengths(cls, lengths: list[int], context_lens: list[int] | None = None,
                     block_tables: list[list[int]] | None = None,
                     slots: list[int] | None = None) -> "AttentionMetadata":
        """Sequences of `lengths` new tokens; with `context_lens`, `block_tables` and `slots`, they are the last
        tokens of each sequence's context in the paged cache."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if context_lens is None:
            return cls(cu_seqlens(lengths), int(lengths.max(initial=0)))
        tables = np.zeros((len(block_tables), max(map(len, block_tables), default=0)), dtype=np.int32)
        for row, table in zip(tables, block_tables):
            row[:len(table)] = table
        return cls.paged(lengths, np.asarray(context_lens), tables, np.asarray(slots, dtype=np.int64))

    @classmethod
    def paged(cls, lengths: np.ndarray, context_lens: np.ndarray, block_tables: np.ndarray,
              slots: np.ndarray) -> "AttentionMetadata":
        """The same from arrays (the runner's persistent batch gathers them)."""
        return cls(cu_seqlens(lengths), int(lengths.max(initial=0)),
                   context_lens=torch.from_numpy(context_lens.astype(np.int32)),
                   block_tables=torch.from_numpy(np.ascontiguousarray(block_tables, dtype=np.int32)),
                   slot_mapping=torch.from_numpy(slots.astype(np.int64)),
                   max_context_len=int(context_lens.max(initial=0)), has_prefix=bool((context_lens > lengths).any()))

    def to(self, device: torch.device) -> "AttentionMetadata":
        if self.cu_seqlens.device == device:
            return self
        moved = {f.name: to_device(getattr(self, f.name), device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def cu_seqlens(lengths: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, causal: bool,
                     scale: float) -> torch.Tensor:
    """q: (T, H, d); k, v: (T, KVH, d), H a multiple of KVH. Each sequence's span attends only to itself."""
    if not q.is_cuda:
        return varlen_attention_ref(q, k, v, meta.cu_seqlens, causal, scale)
    meta = meta.to(q.device)
    if q.dtype != torch.float32 and _has_flash(q.device.index):
        return _flash_varlen()(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                               scale=scale, window_size=(-1, 0) if causal else (-1, -1))
    from vlserve.kernels.paged_attention_triton import prefill_attention
    return prefill_attention(q, k, v, meta.cu_seqlens, scale, causal=causal)


@functools.cache
def _has_flash(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # torch's flash attention starts at sm_80


@functools.cache
def _flash_varlen():
    from torch.nn.attention.varlen import varlen_attn
    # Newer torch asks for enable_gqa before it takes fewer KV heads; older flash kernels take them as they are.
    gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
    return functools.partial(varlen_attn, enable_gqa=True) if gqa else varlen_attn


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Stores the step's new keys/values in `kv_cache`, then attends each sequence's new tokens over its context.
    All of the step's KV is stored before any attention reads, so a sequence may use blocks that another
    sequence fills in this same step (the prefix cache relies on it)."""
    if not q.is_cuda:
        store_kv_ref(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta.cu_seqlens, meta.context_lens, meta.block_tables, scale)
    from vlserve.kernels.kv_store_triton import store_kv
    from vlserve.kernels.paged_attention_triton import paged_decode, prefill_attention
    meta = meta.to(q.device)
    store_kv(k, v, kv_cache, meta.slot_mapping)
    if meta.max_seqlen == 1 and q.shape[0] == meta.cu_seqlens.shape[0] - 1:  # one new token per sequence
        return paged_decode(q, kv_cache, meta.context_lens, meta.block_tables, meta.max_context_len, scale)
    if not meta.has_prefix:
        return varlen_attention(q, k, v, meta, causal=True, scale=scale)
    return prefill_attention(q, kv_cache[0], kv_cache[1], meta.cu_seqlens, scale, context_lens=meta.context_lens,
                             block_tables=meta.block_tables)


class Attention(nn.Module):
    """Causal self-attention of the language model. The runner sets `kv_cache` to this layer's cache tensor
    (2, num_blocks, block_size, num_kv_heads, head_dim)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.slot_mapping is None:
            return varlen_attention(q, k, v, meta, causal=True, scale=self.scale)
        return paged_attention(q, k, v, self.kv_cache, meta, self.scale)
