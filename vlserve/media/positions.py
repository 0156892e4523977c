"""M-RoPE position ids of a prompt: three rows (temporal, height, width), one column per token.

Text tokens carry one counter on all three rows. A run of pad tokens of one image or video (or one video frame:
Qwen3-VL) carries its merged-grid indices offset by where the run starts, and the text after it restarts at the
run's largest position + 1. That is Qwen's original rule, used by vLLM and by the trained model. transformers 5.24's
`get_rope_index` instead advances by max(grid_h, grid_w) // merge after a run: the same for images and for
videos whose temporal positions stay within the spatial extent, smaller (overlapping) for longer videos.
"""

import torch

from vlserve.config import ModelConfig, VisionConfig
from vlserve.engine.sequence import MediaSpan
from vlserve.media.item import MediaItem


def mrope_positions(num_tokens: int, spans: list[MediaSpan], cfg: ModelConfig) -> tuple[torch.Tensor, int]:
    """(3, num_tokens) int64 positions of an expanded prompt whose media pads sit at `spans` (in prompt order, as
    expand_media_tokens gives them), and rope_delta = max position + 1 - num_tokens (decode step n sits at
    n + rope_delta). A span that is one frame of a Qwen3-VL video carries that frame's rows of the item's grid."""
    positions = torch.empty(3, num_tokens, dtype=torch.int64)
    cursor = next_pos = 0  # next token, next free position
    for span in spans:
        positions[:, cursor:span.start] = torch.arange(next_pos, next_pos + span.start - cursor)
        rows = _span_positions(span.item, cfg.vision)[:, span.offset:span.offset + span.end - span.start]
        positions[:, span.start:span.end] = rows + next_pos + span.start - cursor
        next_pos = int(positions[:, span.start:span.end].max()) + 1
        cursor = span.end
    positions[:, cursor:] = torch.arange(next_pos, next_pos + num_tokens - cursor)
    # Every segment starts above the previous one's maximum, so the last free position is max + 1.
    next_pos += num_tokens - cursor
    return positions, next_pos - num_tokens


def _span_positions(item: MediaItem, vision: VisionConfig) -> torch.Tensor:
    """(3, num_tokens) positions of one item's pad run, from 0, in the vision tower's output order (t, h, w)."""
    t, h, w = item.grid_thw
    h, w = h // vision.spatial_merge_size, w // vision.spatial_merge_size
    # Images have one temporal step at 0. Qwen2.5-VL spaces a video's steps by real time, computed in float32 in
    # the same order as Qwen's and vLLM's code so the floor lands on the same integers; Qwen2-VL by one a step;
    # Qwen3-VL gives each step its own run (after its timestamp), each at temporal 0.
    if item.modality != "video" or vision.timestamps:
        t_index = torch.zeros(t, dtype=torch.int64)
    elif vision.absolute_time:
        t_index = (torch.arange(t) * item.second_per_grid_t * vision.tokens_per_second).long()
    else:
        t_index = torch.arange(t)
    return torch.stack([
        t_index.view(t, 1, 1).expand(t, h, w).flatten(),
        torch.arange(h).view(1, h, 1).expand(t, h, w).flatten(),
        torch.arange(w).view(1, 1, w).expand(t, h, w).flatten(),
    ])
