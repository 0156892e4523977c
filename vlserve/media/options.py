"""Preprocessing options: the server's defaults, overridable per request (`mm_processor_kwargs`)."""

from dataclasses import dataclass, fields, replace
from typing import Any

from vlserve.errors import MediaError

PATCH_FACTOR = 28  # patch 14 x merge 2: image sides are multiples of this
SERVER_LIMITS = ("max_source_pixels", "max_aspect_ratio")  # guards a request must not loosen


@dataclass(frozen=True)
class MediaOptions:
    # images (qwen-vl-utils defaults)
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    # videos
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: int = int(128000 * 28 * 28 * 0.9)
    # decoding guards: refuse before decoding the full image/video
    max_source_pixels: int = 8192 * 8192  # width x height of an encoded image or video frame
    max_aspect_ratio: float = 200.0

    def updated(self, overrides: dict[str, Any] | None) -> "MediaOptions":
        """Apply `mm_processor_kwargs`; unknown keys and bad values are errors naming the key."""
        if not overrides:
            return self
        known = {f.name: f.type for f in fields(self)}
        clean = {}
        for key, value in overrides.items():
            if key in SERVER_LIMITS:
                raise MediaError(f"mm_processor_kwargs key {key!r} is a server limit and cannot be set per request")
            if key not in known:
                allowed = sorted(set(known) - set(SERVER_LIMITS))
                raise MediaError(f"unknown mm_processor_kwargs key {key!r}; known keys: {', '.join(allowed)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise MediaError(f"mm_processor_kwargs[{key!r}] must be a positive number, got {value!r}")
            clean[key] = float(value) if known[key] in (float, "float") else int(value)
        opts = replace(self, **clean)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.min_pixels > self.max_pixels:
            raise MediaError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.video_min_pixels > self.video_max_pixels:
            raise MediaError(
                f"video_min_pixels ({self.video_min_pixels}) is larger than video_max_pixels ({self.video_max_pixels})"
            )
        if self.min_frames > self.max_frames:
            raise MediaError(f"min_frames ({self.min_frames}) is larger than max_frames ({self.max_frames})")
