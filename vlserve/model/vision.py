"""The Qwen2-VL and Qwen2.5-VL vision towers: patch embedding, attention blocks, patch merger. Qwen2.5-VL's blocks
use RMSNorm and a gated SiLU MLP, and attend within windows but for a few full-attention blocks; Qwen2-VL's use
LayerNorm and an fc1/fc2 MLP and attend over whole frames (VisionConfig says which).

Two ways to run under tensor parallel (--mm-encoder-tp-mode): data mode keeps the weights whole on every rank
(images are independent, so ranks split the images); weights mode splits attention heads, the MLPs and the merger's
MLP over the tensor-parallel group, and every rank runs the same images. The patch embedding stays whole.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlserve.config import VisionConfig
from vlserve.distributed.parallel_state import tp_rank, tp_size
from vlserve.model.layers.activation import ACTIVATIONS, SiluAndMul
from vlserve.model.layers.attention import AttentionMetadata, varlen_attention
from vlserve.model.layers.linear import (
    ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, expect_shape, copy_into,
)
from vlserve.model.layers.norm import LayerNorm, RMSNorm
from vlserve.model.layers.rotary import VisionRotaryEmbedding, apply_vision_rotary
from vlserve.transfer import to_device

DATA_MODE = (0, 1)
FP16_LIMIT = torch.finfo(torch.float16).max - 1000  # activations of the last blocks can overflow fp16


@dataclass
class VisionLayout:
    """Token order and attention spans for a batch of images/videos, computed once per forward."""

    hw_positions: torch.Tensor  # (N, 2) row/column of each patch, merge groups contiguous
    window_order: torch.Tensor | None  # (N/4,) merge groups reordered so each window is contiguous; None: no windows
    full: AttentionMetadata  # one span per frame (full attention)
    window: AttentionMetadata | None  # one span per window


def vision_layout(grid_thw: list[tuple[int, int, int]], cfg: VisionConfig) -> VisionLayout:
    m = cfg.spatial_merge_size
    positions, order, full, window, offset = [], [], [], [], 0
    for t, h, w in grid_thw:
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        hw = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
        positions.append(hw.repeat(t, 1))
        full.extend([h * w] * t)
    if cfg.window_size is None:
        return VisionLayout(torch.cat(positions), None, AttentionMetadata.from_lengths(full), None)
    win = cfg.window_size // m // cfg.patch_size  # window side in merged tokens
    for t, h, w in grid_thw:
        gh, gw = h // m, w // m
        groups = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r in range(0, gh, win):
                for c in range(0, gw, win):
                    ids = groups[ti, r:r + win, c:c + win].flatten()
                    order.append(ids + offset)
                    window.append(ids.numel() * m * m)
        offset += t * gh * gw
    return VisionLayout(torch.cat(positions), torch.cat(order), AttentionMetadata.from_lengths(full),
                        AttentionMetadata.from_lengths(window))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with stride == kernel is a linear map over each flattened patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.conv_shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.patch_dim), requires_grad=False)
        self.proj.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, name, shard_id=None):
        expect_shape(name, loaded, self.conv_shape)
        copy_into(param, (loaded if isinstance(loaded, torch.Tensor) else loaded[:]).reshape(param.shape))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.linear(pixel_values.to(self.proj.weight.dtype), self.proj.weight)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, tp):
        super().__init__()
        self.qkv = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_heads, bias=True, tp=tp)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True, tp=tp)
        self.heads, self.head_dim = self.qkv.num_heads, cfg.head_dim

    def forward(self, x, cos, sin, meta: AttentionMetadata):
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, meta, causal=False, scale=self.head_dim**-0.5)
        return self.proj(out.flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, tp):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=True, tp=tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, tp=tp)
        self.act = SiluAndMul()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class VisionFcMLP(nn.Module):
    """Qwen2-VL's: fc1, the checkpoint's activation (QuickGELU), fc2."""

    def __init__(self, cfg: VisionConfig, tp):
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True, tp=tp)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, tp=tp)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def vision_norm(cfg: VisionConfig) -> nn.Module:
    return LayerNorm(cfg.hidden_size) if cfg.norm == "layer" else RMSNorm(cfg.hidden_size)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, tp):
        super().__init__()
        self.norm1 = vision_norm(cfg)
        self.norm2 = vision_norm(cfg)
        self.attn = VisionAttention(cfg, tp)
        self.mlp = VisionFcMLP(cfg, tp) if cfg.mlp == "fc" else VisionMLP(cfg, tp)

    def forward(self, x, cos, sin, meta):
        x = x + self.attn(self.norm1(x), cos, sin, meta)
        x = x + self.mlp(self.norm2(x))
        if x.dtype == torch.float16:
            x = x.clamp(-FP16_LIMIT, FP16_LIMIT)
        return x


class PatchMerger(nn.Module):
    """The tower's norm, then each 2x2 group of patches (concatenated) through a GELU MLP into the LM's width."""

    def __init__(self, cfg: VisionConfig, tp):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = vision_norm(cfg)
        self.mlp = nn.ModuleDict({
            "0": ColumnParallelLinear(self.merged, self.merged, bias=True, tp=tp),
            "2": RowParallelLinear(self.merged, cfg.out_hidden_size, bias=True, tp=tp),
        })

    def forward(self, x):
        x = self.ln_q(x).view(-1, self.merged)
        return self.mlp["2"](F.gelu(self.mlp["0"](x)))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, tp_mode: str = "data"):
        """tp_mode: "data" or "weights" (split over this rank's tensor-parallel group), as --mm-encoder-tp-mode."""
        super().__init__()
        self.cfg = cfg
        tp = DATA_MODE if tp_mode == "data" else (tp_rank(), tp_size())
        self.patch_embed = PatchEmbed(cfg)
        self.rotary = VisionRotaryEmbedding(cfg.head_dim)
        self.blocks = nn.ModuleList(VisionBlock(cfg, tp) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, tp)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values: (N, patch_dim) for all items; returns (N / 4, out_hidden) in the items' order."""
        layout = vision_layout(grid_thw, self.cfg)
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary.cos_sin(to_device(layout.hw_positions, device))
        order = None if layout.window_order is None else to_device(layout.window_order, device)
        if order is not None:  # each window's patches contiguous (merge groups stay whole)
            unit = self.cfg.spatial_merge_size**2
            x, cos, sin = (t.view(-1, unit, t.shape[-1])[order].flatten(0, 1) for t in (x, cos, sin))
        full_blocks = set(self.cfg.fullatt_block_indexes)
        full = layout.full.to(device)  # once per forward, not per block
        window = None if layout.window is None else layout.window.to(device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in full_blocks else window)
        merged = self.merger(x)
        return merged if order is None else merged[torch.argsort(order)]
