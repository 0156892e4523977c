"""One preprocessed image or video, ready for the vision tower."""

from dataclasses import dataclass, field
from typing import Literal

import torch

from vlserve.media.options import grid_tokens


@dataclass
class MediaItem:
    modality: Literal["image", "video"]
    pixel_values: torch.Tensor  # (grid_t * grid_h * grid_w, channels * temporal_patch * patch * patch), float32
    grid_thw: tuple[int, int, int]
    content_hash: str  # stable hex digest of the source and the preprocessing that shaped it
    second_per_grid_t: float = 1.0  # seconds covered by one temporal grid step (videos)
    frame_seconds: tuple[float, ...] = ()  # videos: each temporal grid step's time in the video (its frames' mean)
    merge_size: int = field(kw_only=True)  # merge_size x merge_size patches make one token (the checkpoint's)

    @property
    def num_tokens(self) -> int:
        return grid_tokens(self.grid_thw, self.merge_size)
