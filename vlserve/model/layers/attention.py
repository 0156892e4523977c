"""Attention dispatch: fresh sequences attend within the batch; engine steps go through the paged KV cache."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlserve.kernels.kv_store import store_kv_ref
from vlserve.kernels.paged_attention import paged_attention_ref


@dataclass
class AttentionMetadata:
    """How the flattened new tokens of one forward pass split into sequences, and where their KV lives."""

    cu_seqlens: list[int]  # boundaries of each sequence's new tokens in the flat batch, starting at 0
    # Paged KV cache (None: no cache, every sequence is entirely new and attends only to itself)
    context_lens: list[int] | None = None  # per sequence: cached + new tokens
    block_tables: list[list[int]] | None = None  # per sequence: its KV blocks in order
    slot_mapping: torch.Tensor | None = None  # (T,) flat cache slot of each new token

    @classmethod
    def from_lengths(cls, lengths: list[int]) -> "AttentionMetadata":
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        return cls(cu_seqlens=cu)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], causal: bool,
                     scale: float) -> torch.Tensor:
    """q: (T, H, d); k, v: (T, KVH, d), H a multiple of KVH. Each [cu[i], cu[i+1]) span attends only to itself."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end == start:
            continue
        # 4-D (batch of one): the fused, memory-linear SDPA kernels take only 4-D inputs
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out


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
            return varlen_attention(q, k, v, meta.cu_seqlens, causal=True, scale=self.scale)
        # All of the step's KV is stored before any attention reads, so a sequence may use blocks that another
        # sequence fills in this same step (the prefix cache relies on it).
        store_kv_ref(k, v, self.kv_cache, meta.slot_mapping)
        return paged_attention_ref(q, self.kv_cache, meta.cu_seqlens, meta.context_lens, meta.block_tables,
                                   self.scale)
