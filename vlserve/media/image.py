"""Images, preprocessed exactly as transformers' Qwen2VLImageProcessorPil does (same bits), faster.

transformers: RGB conversion, PIL bicubic resize on uint8, then x * (1/255) in float64 cast to float32,
(x - mean) / std in float32, patchify. We resize the same way, then patchify the uint8 pixels (moving 1-byte
values is 4x cheaper than float32 ones) and normalize the patches with the same float32 operations.

Contracts:
- `image_resize(height, width, options)` is the one size rule: source size -> resized size and grid_thw.
- `probe_image(data, options)` reads only the header and returns the grid_thw that `process_image(data,
  options)` gives, refusing what `open_image` refuses before decoding (format, max_source_pixels, Pillow's
  decompression-bomb limit, aspect ratio, empty image). EXIF orientation is not applied (transformers'
  processor does not apply it to a PIL image either), so the header's size is the size that gets resized.
- Errors are MediaError (MediaTooLargeError for size limits) saying what to change.
"""

import io
import math
import warnings
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

from vlserve.errors import MediaError, MediaTooLargeError
from vlserve.media.fetch import content_hash
from vlserve.media.item import MediaItem
from vlserve.media.options import MediaOptions

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # the Pillow decoders clients may use (JPEG covers MPO)


def smart_resize(
    height: int,
    width: int,
    min_pixels: int,
    max_pixels: int,
    factor: int,
    max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """(height, width) as multiples of `factor` with area in [min_pixels, max_pixels], aspect kept (Qwen's rule)."""
    if min(height, width) < 1:
        raise MediaError(f"image is {width}x{height} pixels: it is empty; send an image with pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise MediaError(
            f"image is {width}x{height} pixels, aspect ratio {ratio:.1f} is over the limit of {max_aspect_ratio:g} "
            "(max_aspect_ratio); crop or pad the image so its long side is at most that many times its short side"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Resize(NamedTuple):
    """What preprocessing makes of an image of a given source size."""
    height: int  # resized, a multiple of options.factor
    width: int
    grid_thw: tuple[int, int, int]  # in patches: (1, height // patch_size, width // patch_size)


def image_resize(height: int, width: int, options: MediaOptions) -> Resize:
    """The resized size and grid of a `height` x `width` image (smart_resize with the image options); raises
    MediaError for an empty image or one over max_aspect_ratio."""
    h, w = smart_resize(height, width, options.min_pixels, options.max_pixels, options.factor,
                        options.max_aspect_ratio)
    return Resize(h, w, (1, h // options.patch_size, w // options.patch_size))  # an image is one temporal patch


def probe_image(data: bytes, options: MediaOptions) -> tuple[int, int, int]:
    """grid_thw that `process_image(data, options)` would give, from the image header alone (no pixels are
    decoded); raises what `open_image` raises before decoding. An image whose pixel data is corrupt probes
    fine and fails later, in `process_image`."""
    with _pillow_errors():
        width, height = _open_header(data, options).size
    return image_resize(height, width, options).grid_thw


def open_image(data: bytes, options: MediaOptions) -> Image.Image:
    """Decode `data` to RGB; an image whose header is over `options.max_source_pixels` (or over
    max_aspect_ratio) is refused undecoded."""
    with _pillow_errors():
        image = _open_header(data, options)
        image.load()
        return to_rgb(image)


def _open_header(data: bytes, options: MediaOptions) -> Image.Image:
    """The image with only its header read, after the checks that need no pixels."""
    image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    width, height = image.size
    if width * height > options.max_source_pixels:
        raise MediaTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{options.max_source_pixels:,} (max_source_pixels); downscale it before sending"
        )
    image_resize(height, width, options)  # empty or too elongated: refused before decoding
    return image


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """Pillow's many exception types as MediaError; Pillow's bomb warning silenced (max_source_pixels rules)."""
    try:
        with warnings.catch_warnings():
            # (the filter is process-wide: should a concurrent call leave it on, that is harmless too)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except MediaError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked inside Image.open
        raise MediaTooLargeError(f"image refused before decoding: {e} Downscale it before sending.") from e
    except Image.UnidentifiedImageError as e:
        raise MediaError(f"image bytes are not in a supported format; send one of: {', '.join(FORMATS)}") from e
    except Exception as e:  # Pillow raises many exception types on malformed files
        raise MediaError(f"could not decode the image ({type(e).__name__}: {e}); send an intact image file") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb: transparency composited on white, other modes via Pillow's convert."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def patchify(frames: np.ndarray, options: MediaOptions) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, C, H, W) frames of any dtype -> (grid_t*grid_h*grid_w, C*temporal_patch*patch*patch), grid_thw, in
    the patch geometry of `options` (the checkpoint's).

    Patch order is transformers': row-major over merge groups, the merge*merge patches of a group contiguous,
    each patch laid out (C, temporal_patch, patch, patch). One copy; `frames` may be a strided or broadcast view.
    """
    temporal_patch, patch, merge = options.temporal_patch_size, options.patch_size, options.merge_size
    t, c, h, w = frames.shape
    if t % temporal_patch or h % (patch * merge) or w % (patch * merge):
        raise ValueError(
            f"frames {frames.shape} must have T a multiple of {temporal_patch} and H, W multiples of {patch * merge}"
        )
    gt, gh, gw = t // temporal_patch, h // patch, w // patch
    x = frames.reshape(gt, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).copy()
    return x.reshape(gt * gh * gw, c * temporal_patch * patch * patch), (gt, gh, gw)


def normalize_patches(patches: np.ndarray, options: MediaOptions) -> torch.Tensor:
    """uint8 RGB patches from `patchify` -> float32 (x / 255 - mean) / std (the options' image_mean, image_std),
    bit-equal to transformers.

    Bit-equal because x / 255 in float32 equals transformers' float64 x * (1/255) cast to float32 for all 256
    values, and mean/std are applied with the same float32 subtract and divide (tests check all 3 x 256 cases).
    """
    x = torch.from_numpy(patches).view(len(patches), 3, -1).float()
    mean = torch.tensor(options.image_mean, dtype=torch.float32).view(3, 1)
    x.div_(255).sub_(mean).div_(torch.tensor(options.image_std, dtype=torch.float32).view(3, 1))
    return x.view(len(patches), -1)


def process_image(image: Image.Image | bytes, options: MediaOptions, source_hash: str | None = None) -> MediaItem:
    """One image (encoded bytes or a PIL image) -> pixel patches, grid and content hash."""
    if isinstance(image, bytes):
        source_hash = source_hash or content_hash(image)
        image = open_image(image, options)
    else:
        source_hash = source_hash or content_hash(image.mode, f"{image.width}x{image.height}", image.tobytes())
        image = to_rgb(image)
    height, width, _ = image_resize(image.height, image.width, options)
    if image.size != (width, height):  # Pillow's same-size resize is a plain copy
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    frame = np.asarray(image).transpose(2, 0, 1)  # (C, H, W) view of Pillow's (H, W, C)
    frames = np.broadcast_to(frame, (options.temporal_patch_size, *frame.shape))  # an image is one frame, repeated
    patches, grid_thw = patchify(frames, options)
    item_hash = content_hash("image", source_hash, f"{height}x{width}")
    return MediaItem("image", normalize_patches(patches, options), grid_thw, item_hash, merge_size=options.merge_size)
