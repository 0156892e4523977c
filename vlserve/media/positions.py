"""M-RoPE position ids of a prompt: three rows (temporal, height, width), one column per token.

Text tokens carry one counter on all three rows. The run of pad tokens of one image or video carries its
merged-grid indices offset by where the run starts, and the text after it restarts at the run's largest
position + 1. That is Qwen's original rule, used by vLLM and by the trained model. transformers 5.24's
`get_rope_index` instead advances by max(grid_h, grid_w) // merge after a run: the same for images and for
videos whose temporal positions stay within the spatial extent, smaller (overlapping) for longer videos.
"""

import torch

from vlserve.config import ModelConfig, VisionConfig
from vlserve.media.item import MediaItem


def mrope_positions(token_ids: list[int], media: list[MediaItem], cfg: ModelConfig) -> tuple[torch.Tensor, int]:
    """(3, L) int64 positions and rope_delta = max position + 1 - L (decode step n sits at n + rope_delta).

    `token_ids` must already be expanded (`expand_media_tokens`): item k owns the k-th run of num_tokens pads.
    """
    ids = torch.tensor(token_ids, dtype=torch.int64)
    is_pad = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    pads = torch.nonzero(is_pad).flatten().tolist() if media else []
    needed = sum(item.num_tokens for item in media)
    if len(pads) != needed:
        raise ValueError(f"the prompt holds {len(pads)} media pad tokens but its {len(media)} media items need "
                         f"{needed}; expand the pads with expand_media_tokens first")
    positions = torch.empty(3, len(token_ids), dtype=torch.int64)
    cursor = next_pos = used = 0  # next token, next free position, pads consumed
    for item in media:
        start = pads[used]
        used += item.num_tokens
        positions[:, cursor:start] = torch.arange(next_pos, next_pos + start - cursor)
        span = _span_positions(item, cfg.vision) + next_pos + start - cursor
        positions[:, start:start + item.num_tokens] = span
        next_pos = int(span.max()) + 1
        cursor = start + item.num_tokens
    positions[:, cursor:] = torch.arange(next_pos, next_pos + len(token_ids) - cursor)
    # Every segment starts above the previous one's maximum, so the last free position is max + 1.
    next_pos += len(token_ids) - cursor
    return positions, next_pos - len(token_ids)


def _span_positions(item: MediaItem, vision: VisionConfig) -> torch.Tensor:
    """(3, num_tokens) positions of one item's pad run, from 0, in the vision tower's output order (t, h, w)."""
    t, h, w = item.grid_thw
    h, w = h // vision.spatial_merge_size, w // vision.spatial_merge_size
    # Images have one temporal step at 0. Qwen2.5-VL spaces a video's steps by real time, computed in float32 in
    # the same order as Qwen's and vLLM's code so the floor lands on the same integers; Qwen2-VL by one a step.
    if item.modality != "video":
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
