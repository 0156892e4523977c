"""Rotary embeddings: M-RoPE for the language model, 2-D (height, width) RoPE for the vision tower."""

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class MRotaryEmbedding(nn.Module):
    """Rotary pairs are split into sections fed by the temporal, height and width position rows.

    Text tokens have three equal rows, which is plain RoPE; so decode can pass 1-D positions (`pos + rope_delta`).
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int], interleaved: bool = False):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta), persistent=False)
        self.register_buffer("row_of_pair", rows_of_pairs(mrope_section, interleaved), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (L,) or (3, L). Returns cos, sin of shape (L, head_dim)."""
        freqs = positions.float()[..., None] * self.inv_freq  # (L, d/2) or (3, L, d/2)
        if positions.dim() == 2:
            freqs = freqs.gather(0, self.row_of_pair.expand(1, freqs.shape[1], -1)).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: (L, heads, d), k: (L, kv_heads, d)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rows_of_pairs(mrope_section: tuple[int, int, int], interleaved: bool) -> torch.Tensor:
    """Which position row (t=0, h=1, w=2) drives each rotary pair: three contiguous sections (Qwen2-VL, Qwen2.5-VL),
    or interleaved t, h, w, t, h, w, ... while the h and w sections last, t for the rest (Qwen3-VL)."""
    if not interleaved:
        return torch.cat([torch.full((n,), r, dtype=torch.long) for r, n in enumerate(mrope_section)])
    pair = torch.arange(sum(mrope_section))
    rows = torch.zeros_like(pair)
    for row in (1, 2):
        rows[(pair % 3 == row) & (pair < 3 * mrope_section[row])] = row
    return rows


class VisionRotaryEmbedding(nn.Module):
    """Half the head dim rotates with the patch row, half with the patch column (theta 10000)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(head_dim // 2, theta), persistent=False)

    def cos_sin(self, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw_positions: (N, 2). Returns fp32 cos, sin of shape (N, head_dim)."""
        freqs = (hw_positions.float()[..., None] * self.inv_freq).flatten(1)  # (N, d/2): h freqs then w freqs
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, d); rotation in fp32 as the vision tower was trained."""
    xf = x.float()
    return (xf * cos.unsqueeze(1) + rotate_half(xf) * sin.unsqueeze(1)).to(x.dtype)
