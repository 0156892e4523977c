"""Preprocessing options: the server's defaults, overridable per request (`mm_processor_kwargs`).

Contracts:
- `MediaOptions.updated(overrides)` is for the server's own settings (--mm-processor-kwargs, `LLM(...)`): any
  known key except the decoding guards in SERVER_LIMITS may be set to any positive, finite number.
- `MediaOptions.tightened(overrides)` is for what a request sends: the same key and value checks, and no value
  may raise a ceiling of the server's options (`self`), see CEILINGS. A request can ask for less work than the
  server allows (fewer pixels, frames, a lower fps), never more: a 100-byte request must not be able to make
  the server upscale a 1x1 image to 3e8 pixels.
- Every option set that either returns passes `validate()` (each minimum at most its maximum).
- The patch geometry (CHECKPOINT_FIELDS) is the vision tower's, read from the checkpoint (`for_vision`); neither
  a flag nor a request sets it. Its defaults are Qwen2.5-VL's, as transformers' Qwen2VLImageProcessor has them,
  for callers without a checkpoint.
- Errors are MediaError whose message names the key, the value and what to change.
"""

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from vlserve.errors import MediaError

SERVER_LIMITS = ("max_source_pixels", "max_aspect_ratio")  # guards a request must not loosen
# the vision tower's, from config.json (the normalization: the family's processor's)
CHECKPOINT_FIELDS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
# per-request key -> the server option its value may not exceed (`tightened`)
CEILINGS = {
    "min_pixels": "max_pixels",
    "max_pixels": "max_pixels",
    "video_min_pixels": "video_max_pixels",
    "video_max_pixels": "video_max_pixels",
    "video_total_pixels": "video_total_pixels",
    "min_frames": "max_frames",
    "max_frames": "max_frames",
    "fps": "fps",
}


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's and Qwen2.5-VL's normalization (Qwen3-VL: 0.5, 0.5)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def grid_tokens(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    """Language-model tokens of an image or video of `grid_thw` patches: merge_size x merge_size patches make one."""
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)


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
    # the vision tower's patch geometry (CHECKPOINT_FIELDS)
    patch_size: int = 14  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch (an image is its frame repeated)
    merge_size: int = 2  # merge_size x merge_size patches become one language-model token
    image_mean: tuple[float, float, float] = CLIP_MEAN  # pixels in [0, 1] minus this,
    image_std: tuple[float, float, float] = CLIP_STD  # divided by this

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token's side in pixels."""
        return self.patch_size * self.merge_size

    def largest_image_grid(self) -> tuple[int, int, int]:
        """The grid of the largest image these options allow, a square of max_pixels (sides floored to multiples
        of `factor`): what the engine's profiling step encodes and the planner sizes."""
        side = int(self.max_pixels**0.5) // self.factor * self.factor
        return 1, side // self.patch_size, side // self.patch_size

    def for_vision(self, vision) -> "MediaOptions":
        """These options with the patch geometry of `vision` (a config.VisionConfig, read from the checkpoint)."""
        return replace(self, patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                       merge_size=vision.spatial_merge_size, image_mean=vision.image_mean, image_std=vision.image_std)

    def updated(self, overrides: dict[str, Any] | None) -> "MediaOptions":
        """The server's own settings: apply `mm_processor_kwargs` from a flag; unknown keys and bad values are
        errors naming the key. Per-request kwargs go through `tightened` instead."""
        if not overrides:
            return self
        opts = replace(self, **self._clean(overrides))
        opts.validate()
        return opts

    def tightened(self, overrides: dict[str, Any] | None) -> "MediaOptions":
        """A request's `mm_processor_kwargs` applied to the server's options (`self`): as `updated`, and each
        value must be at most the server's value of the option it is bounded by (CEILINGS), so a request can
        only lower the work per image or video."""
        if not overrides:
            return self
        clean = self._clean(overrides)
        for key, value in clean.items():
            self._check_ceiling(key, value)
        opts = replace(self, **clean)
        opts.validate()
        return opts

    def _clean(self, overrides: dict[str, Any]) -> dict[str, int | float]:
        """Keys checked against the fields, values converted to each field's type."""
        if not isinstance(overrides, dict):
            raise MediaError(f"mm_processor_kwargs must be an object of key: number, got {type(overrides).__name__}")
        known = {f.name: f.type for f in fields(self)}
        clean = {}
        for key, value in overrides.items():
            if key in SERVER_LIMITS:
                raise MediaError(f"mm_processor_kwargs key {key!r} is a server limit and cannot be set per request")
            if key in CHECKPOINT_FIELDS:
                raise MediaError(f"mm_processor_kwargs key {key!r} is the vision tower's, read from the checkpoint's "
                                 "config.json; it cannot be set")
            if key not in known:
                allowed = sorted(set(known) - set(SERVER_LIMITS) - set(CHECKPOINT_FIELDS))
                raise MediaError(f"unknown mm_processor_kwargs key {key!r}; known keys: {', '.join(allowed)}")
            clean[key] = _positive(key, value, float if known[key] in (float, "float") else int)
        return clean

    def _check_ceiling(self, key: str, value: int | float) -> None:
        ceiling = CEILINGS[key]
        limit = getattr(self, ceiling)
        if value > limit:
            which = "limit" if key == ceiling else ceiling
            raise MediaError(
                f"mm_processor_kwargs {key} {_show(value)} is over the server's {which} of {_show(limit)}; "
                f"ask for at most that, or start the server with a larger "
                f"--mm-processor-kwargs '{{\"{ceiling}\": ...}}'"
            )

    def validate(self) -> None:
        """Each minimum at most its maximum; the message says which to change."""
        for low, high in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels"),
                          ("min_frames", "max_frames")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value > high_value:
                raise MediaError(
                    f"{low} ({low_value}) is larger than {high} ({high_value}); "
                    f"set {low} to at most {high_value}, or {high} to at least {low_value}"
                )


def _positive(key: str, value: Any, kind: type) -> int | float:
    """`value` as `kind` if it is a finite number > 0 (and, for an int field, still >= 1 once truncated)."""
    bad = MediaError(f"mm_processor_kwargs[{key!r}] must be a positive number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    try:
        converted = kind(value)  # int(inf), int(nan) and float(10**400) raise
    except (OverflowError, ValueError):
        raise bad from None
    if (kind is float and not math.isfinite(converted)) or converted <= 0:  # nan, inf, 0, -1, 0.5 as an int
        raise bad
    return converted


def _show(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"
