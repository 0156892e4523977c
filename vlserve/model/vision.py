"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers: patch embedding, attention blocks, patch merger. Qwen2.5-VL's
blocks use RMSNorm and a gated SiLU MLP, and attend within windows but for a few full-attention blocks; Qwen2-VL's
use LayerNorm and an fc1/fc2 MLP and attend over whole frames. Qwen3-VL's are Qwen2-VL's (GELU-tanh MLP) plus a
learned position grid resampled to each image, and DeepStack: the outputs of a few blocks, each through its own
merger, appended to each token's embedding (VisionConfig says which).

Two ways to run under tensor parallel (--mm-encoder-tp-mode): data mode keeps the weights whole on every rank
(images are independent, so ranks split the images); weights mode splits attention heads, the MLPs and the merger's
MLP over the tensor-parallel group, and every rank runs the same images. The patch embedding stays whole.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlserve.config import VisionConfig
from vlserve.distributed.parallel_state import tp_rank, tp_size
from vlserve.model.layers.activation import ACTIVATIONS, SiluAndMul
from vlserve.model.layers.attention import AttentionMetadata, varlen_attention
from vlserve.model.layers.linear import (
    ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, copy_into,
    default_weight_loader, expect_shape,
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
    grid_taps: tuple[torch.Tensor, torch.Tensor] | None = None  # learned-grid entries and weights (N, 4) per patch


def vision_layout(grid_thw: list[tuple[int, int, int]], cfg: VisionConfig) -> VisionLayout:
    m = cfg.spatial_merge_size
    positions, sizes, order, full, window, offset = [], [], [], [], [], 0
    for t, h, w in grid_thw:
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        hw = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
        positions.append(hw.repeat(t, 1))
        sizes.append(torch.tensor([h, w]).expand(t * h * w, 2))
        full.extend([h * w] * t)
    hw_positions = torch.cat(positions)
    taps = None if cfg.num_position_embeddings is None else grid_taps(
        hw_positions, torch.cat(sizes), math.isqrt(cfg.num_position_embeddings))
    if cfg.window_size is None:
        return VisionLayout(hw_positions, None, AttentionMetadata.from_lengths(full), None, taps)
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
    return VisionLayout(hw_positions, torch.cat(order), AttentionMetadata.from_lengths(full),
                        AttentionMetadata.from_lengths(window), taps)


def grid_taps(hw_positions: torch.Tensor, sizes: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling (corners aligned) of a `side` x `side` learned grid to each image's (h, w) patches:
    for each patch, the 4 grid entries (row-major indices) and their weights, computed in float32 as
    transformers' Qwen3-VL does."""
    axis = [_axis_taps(hw_positions[:, i], sizes[:, i], side) for i in (0, 1)]
    (rows, row_w), (cols, col_w) = axis
    taps = (rows[:, :, None] * side + cols[:, None, :]).flatten(1)
    return taps, (row_w[:, :, None] * col_w[:, None, :]).flatten(1)


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with stride == kernel is a linear map over each flattened patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.conv_shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.patch_dim), requires_grad=False)
        self.proj.weight.weight_loader = self.weight_loader
        self.proj.bias = None
        if cfg.patch_bias:
            self.proj.bias = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
            self.proj.bias.weight_loader = default_weight_loader

    def weight_loader(self, param, loaded, name, shard_id=None):
        expect_shape(name, loaded, self.conv_shape)
        copy_into(param, (loaded if isinstance(loaded, torch.Tensor) else loaded[:]).reshape(param.shape))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.linear(pixel_values.to(self.proj.weight.dtype), self.proj.weight, self.proj.bias)


class PositionGrid(nn.Module):
    """Qwen3-VL's learned positions: a square grid of embeddings, resampled to each image's patches."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_position_embeddings, cfg.hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each patch's weighted sum of its 4 grid entries, without the (patches, 4, width) gather in between."""
        return F.embedding_bag(taps, self.weight, per_sample_weights=weights.to(self.weight.dtype), mode="sum")


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
    """Qwen2-VL's (fc1, QuickGELU, fc2) and Qwen3-VL's (linear_fc1, GELU tanh, linear_fc2): the checkpoint's
    activation between two linear layers."""

    def __init__(self, cfg: VisionConfig, tp):
        super().__init__()
        fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True, tp=tp)
        fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, tp=tp)
        names = ("fc1", "fc2") if cfg.mlp == "fc" else ("linear_fc1", "linear_fc2")
        for name, layer in zip(names, (fc1, fc2)):
            setattr(self, name, layer)
        self.layers = (fc1, fc2)  # not registered twice: a tuple
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        fc1, fc2 = self.layers
        return fc2(self.act(fc1(x)))


def vision_norm(cfg: VisionConfig) -> nn.Module:
    return LayerNorm(cfg.hidden_size) if cfg.norm == "layer" else RMSNorm(cfg.hidden_size)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, tp):
        super().__init__()
        self.norm1 = vision_norm(cfg)
        self.norm2 = vision_norm(cfg)
        self.attn = VisionAttention(cfg, tp)
        self.mlp = VisionMLP(cfg, tp) if cfg.mlp == "gated" else VisionFcMLP(cfg, tp)

    def forward(self, x, cos, sin, meta):
        x = x + self.attn(self.norm1(x), cos, sin, meta)
        x = x + self.mlp(self.norm2(x))
        if x.dtype == torch.float16:
            x = x.clamp(-FP16_LIMIT, FP16_LIMIT)
        return x


class PatchMerger(nn.Module):
    """The tower's norm, then each 2x2 group of patches (concatenated) through a GELU MLP into the LM's width.
    `grouped`: the norm over each concatenated group instead of each patch (Qwen3-VL's DeepStack mergers)."""

    def __init__(self, cfg: VisionConfig, tp, grouped: bool = False):
        super().__init__()
        self.merged, self.grouped = cfg.hidden_size * cfg.spatial_merge_size**2, grouped
        norm = LayerNorm(self.merged) if grouped else vision_norm(cfg)
        fc1 = ColumnParallelLinear(self.merged, self.merged, bias=True, tp=tp)
        fc2 = RowParallelLinear(self.merged, cfg.out_hidden_size, bias=True, tp=tp)
        if cfg.merger == "linear":  # Qwen3-VL's names
            self.norm, self.linear_fc1, self.linear_fc2 = norm, fc1, fc2
        else:
            self.ln_q, self.mlp = norm, nn.ModuleDict({"0": fc1, "2": fc2})
        self.layers = (norm, fc1, fc2)  # not registered twice: a tuple

    def forward(self, x):
        norm, fc1, fc2 = self.layers
        x = norm(x.view(-1, self.merged)) if self.grouped else norm(x).view(-1, self.merged)
        return fc2(F.gelu(fc1(x)))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, tp_mode: str = "data"):
        """tp_mode: "data" or "weights" (split over this rank's tensor-parallel group), as --mm-encoder-tp-mode."""
        super().__init__()
        self.cfg = cfg
        tp = DATA_MODE if tp_mode == "data" else (tp_rank(), tp_size())
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = PositionGrid(cfg) if cfg.num_position_embeddings is not None else None
        self.rotary = VisionRotaryEmbedding(cfg.head_dim)
        self.blocks = nn.ModuleList(VisionBlock(cfg, tp) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, tp)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, tp, grouped=True) for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values: (N, patch_dim) for all items; returns (N / 4, embed_width) in the items' order: the
        merger's output, then each DeepStack merger's."""
        layout = vision_layout(grid_thw, self.cfg)
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        if self.pos_embed is not None:
            taps, weights = (to_device(t, device) for t in layout.grid_taps)
            x = x + self.pos_embed(taps, weights).to(x.dtype)
        cos, sin = self.rotary.cos_sin(to_device(layout.hw_positions, device))
        order = None if layout.window_order is None else to_device(layout.window_order, device)
        if order is not None:  # each window's patches contiguous (merge groups stay whole)
            unit = self.cfg.spatial_merge_size**2
            x, cos, sin = (t.view(-1, unit, t.shape[-1])[order].flatten(0, 1) for t in (x, cos, sin))
        full_blocks = set(self.cfg.fullatt_block_indexes)
        full = layout.full.to(device)  # once per forward, not per block
        window = None if layout.window is None else layout.window.to(device)
        deepstack = dict(zip(self.cfg.deepstack_visual_indexes, self.deepstack_merger_list))
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in full_blocks else window)
            if i in deepstack:
                features.append(deepstack[i](x))
        merged = torch.cat([self.merger(x), *features], dim=-1) if features else self.merger(x)
        return merged if order is None else merged[torch.argsort(order)]
