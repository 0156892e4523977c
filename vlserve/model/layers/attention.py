"""Attention dispatch. This file holds the plain-torch path that runs anywhere (CPU, tests, any GPU)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """How the flattened tokens of one forward pass split into sequences."""

    cu_seqlens: list[int]  # boundaries of each sequence's tokens in the flat batch, starting at 0

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
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = o.transpose(0, 1)
    return out


class Attention(nn.Module):
    """Causal self-attention of the language model over the sequences of one step."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return varlen_attention(q, k, v, meta.cu_seqlens, causal=True, scale=self.scale)
