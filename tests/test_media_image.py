"""Image preprocessing equals transformers' Qwen2VLImageProcessorPil bit for bit (max abs diff 0.0, not just
<= 1e-5), and bad images fail with typed errors that say what to change."""

import base64
import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_transforms import normalize, rescale
from transformers.image_utils import ChannelDimension
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from media_samples import png_header_only
from vlserve.errors import MediaError, MediaTooLargeError
from vlserve.inputs.media import fetch, preprocess
from vlserve.media.fetch import MediaPolicy
from vlserve.media.image import (
    normalize_patches,
    image_resize,
    open_image,
    patchify,
    probe_image,
    process_image,
    smart_resize,
)
from vlserve.media.options import CLIP_MEAN, CLIP_STD, MediaOptions
from vlserve.media.template import MediaRef

DEFAULTS = MediaOptions()


def reference(min_pixels: int = DEFAULTS.min_pixels, max_pixels: int = DEFAULTS.max_pixels):
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )


@pytest.fixture(scope="module")
def hf():
    return reference()


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    # noise is the hardest case for bicubic rounding and clipping: every value, every edge
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def assert_same_as(item, image: Image.Image, processor) -> None:
    out = processor(images=image, return_tensors="np")
    assert item.modality == "image"
    assert item.grid_thw == tuple(int(v) for v in out["image_grid_thw"][0])
    assert item.pixel_values.dtype == torch.float32
    np.testing.assert_array_equal(item.pixel_values.numpy(), out["pixel_values"])  # exact: tolerance 0.0


@pytest.mark.parametrize(
    "width,height",
    [(28, 28), (10, 10), (56, 28), (640, 480), (333, 777), (1280, 720), (28, 5000), (3000, 20)],
)
def test_rgb_sizes_equal_transformers(hf, width, height):
    image = Image.fromarray(noise(width, height))
    assert_same_as(process_image(image, DEFAULTS), image, hf)


def test_4000x3000_equals_transformers(hf):
    image = Image.fromarray(noise(4000, 3000))
    item = process_image(image, DEFAULTS)
    assert item.grid_thw == (1, 2996 // 14, 4004 // 14)
    assert_same_as(item, image, hf)


def rgba_with_transparency() -> Image.Image:
    pixels = noise(97, 61, channels=4)
    pixels[..., 3] = np.linspace(0, 255, 97, dtype=np.uint8)[None, :]  # every alpha from clear to opaque
    pixels[:10, :, 3] = 0
    return Image.fromarray(pixels, "RGBA")


def palette_with_transparency() -> Image.Image:
    image = Image.fromarray(noise(90, 50)).quantize(16)
    return Image.open(io.BytesIO(encode(image, transparency=3)))


def rgb_with_transparent_colour() -> Image.Image:
    pixels = noise(80, 60)
    pixels[20:40, 10:50] = (10, 20, 30)
    return Image.open(io.BytesIO(encode(Image.fromarray(pixels), transparency=(10, 20, 30))))


@pytest.mark.parametrize(
    "make",
    [
        rgba_with_transparency,
        rgb_with_transparent_colour,
        lambda: Image.fromarray(noise(75, 40, channels=2), "LA"),
        lambda: Image.fromarray(noise(75, 40, channels=1), "L"),
        lambda: Image.fromarray(noise(90, 50)).quantize(64),
        palette_with_transparency,
        lambda: Image.fromarray(noise(64, 64, channels=1) > 127),
    ],
    ids=["RGBA", "RGB+transparency", "LA", "L", "P", "P+transparency", "1"],
)
def test_modes_equal_transformers(hf, make):
    image = make()
    data = encode(image)
    # bytes through our decoder, and the decoded PIL image as given; transformers gets the PIL image
    assert_same_as(process_image(data, DEFAULTS), Image.open(io.BytesIO(data)), hf)
    assert_same_as(process_image(image, DEFAULTS), image, hf)


def test_rgba_transparent_pixels_become_white():
    pixels = np.zeros((28, 28, 4), np.uint8)  # fully transparent black
    item = process_image(Image.fromarray(pixels, "RGBA"), DEFAULTS)
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    channels = item.pixel_values.view(-1, 3, 2 * 14 * 14)
    torch.testing.assert_close(channels, white.view(1, 3, 1).expand_as(channels))


def test_jpeg_bytes_equal_transformers(hf):
    data = encode(Image.fromarray(noise(300, 200)), "JPEG", quality=90)
    assert_same_as(process_image(data, DEFAULTS), Image.open(io.BytesIO(data)), hf)


@pytest.mark.parametrize(
    "width,height,min_pixels,max_pixels",
    [(1280, 720, 256 * 28 * 28, 512 * 28 * 28), (50, 100, 128 * 28 * 28, 16384 * 28 * 28), (500, 300, 784, 784)],
)
def test_custom_min_max_pixels_equal_transformers(width, height, min_pixels, max_pixels):
    options = DEFAULTS.updated({"min_pixels": min_pixels, "max_pixels": max_pixels})
    image = Image.fromarray(noise(width, height))
    assert_same_as(process_image(image, options), image, reference(min_pixels, max_pixels))


@pytest.mark.parametrize("width,height", [(640, 480), (333, 777), (32, 32)])
def test_qwen3_vl_geometry_equals_transformers(width, height):
    """Qwen3-VL's processor: patches of 16 (factor 32), mean and std 0.5, from the checkpoint's config."""
    from vlserve.config import parse_config
    from vlserve.model.tiny import TinySpec, tiny_config

    vision = parse_config(tiny_config(TinySpec(family="qwen3-vl")), "tiny", Path("config.json")).vision
    options = DEFAULTS.for_vision(vision)
    hf3 = Qwen2VLImageProcessorPil(min_pixels=options.min_pixels, max_pixels=options.max_pixels, patch_size=16,
                                   temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = Image.fromarray(noise(width, height))
    assert_same_as(process_image(image, options), image, hf3)


def test_normalize_is_bit_exact_for_every_value_and_channel():
    values = np.tile(np.arange(256, dtype=np.uint8), 3)  # (C=3, 256) flattened, channel-major like patches
    ours = normalize_patches(values.reshape(1, -1), DEFAULTS).numpy().reshape(3, 16, 16)
    chw = values.reshape(3, 16, 16)
    ref = normalize(
        rescale(chw, 1 / 255, input_data_format=ChannelDimension.FIRST),
        CLIP_MEAN,
        CLIP_STD,
        input_data_format=ChannelDimension.FIRST,
    )
    np.testing.assert_array_equal(ours, ref)


def test_patchify_layout_matches_transformers(hf):
    frame = np.random.default_rng(1).standard_normal((3, 56, 84), dtype=np.float32)
    ours, grid = patchify(np.broadcast_to(frame, (2, *frame.shape)), DEFAULTS)
    ref, gh, gw = hf.patchify(frame, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert grid == (1, gh, gw) == (1, 4, 6)
    np.testing.assert_array_equal(ours, ref)


def test_patchify_video_frames_group_in_time():
    frames = np.random.default_rng(2).integers(0, 256, (4, 3, 28, 56), dtype=np.uint8)
    patches, grid = patchify(frames, DEFAULTS)
    assert grid == (2, 2, 4) and patches.shape == (16, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(patches[8:], patchify(frames[2:], DEFAULTS)[0])  # second time step = frames 2, 3
    first = patches[1].reshape(3, 2, 14, 14)  # merge group (0, 0): patch (row 0, col 1)
    np.testing.assert_array_equal(first, frames[:2, :, :14, 14:28].transpose(1, 0, 2, 3))
    with pytest.raises(ValueError, match="multiple"):
        patchify(frames[:3], DEFAULTS)


@pytest.mark.parametrize(
    "height,width,min_pixels,max_pixels,expected",
    [
        (720, 1280, 3136, 12845056, (728, 1288)),
        (28, 28, 3136, 12845056, (56, 56)),
        (4, 4, 3136, 12845056, (56, 56)),
        (3000, 4000, 3136, 12845056, (2996, 4004)),
        (10000, 10000, 3136, 12845056, (3556, 3556)),
        (5000, 28, 3136, 12845056, (5012, 28)),
        (20, 3000, 3136, 12845056, (28, 2996)),
        (1, 200, 3136, 12845056, (28, 812)),
        (720, 1280, 256 * 28 * 28, 512 * 28 * 28, (448, 840)),
        (100, 50, 128 * 28 * 28, 16384 * 28 * 28, (448, 224)),
    ],
)
def test_smart_resize_table(height, width, min_pixels, max_pixels, expected):
    assert smart_resize(height, width, min_pixels, max_pixels, DEFAULTS.factor) == expected
    assert hf_smart_resize(height, width, 28, min_pixels, max_pixels) == expected


def test_smart_resize_sweep_equals_transformers():
    rng = np.random.default_rng(3)
    for height, width in rng.integers(1, 6000, (500, 2)):
        height, width = int(height), int(width)
        if max(height, width) / min(height, width) <= 200:
            assert smart_resize(height, width, 3136, 12845056, 28) == hf_smart_resize(height, width, 28, 3136, 12845056)


def test_aspect_ratio_over_limit():
    with pytest.raises(MediaError, match="max_aspect_ratio") as err:
        smart_resize(10, 2010, 3136, 12845056, 28)
    assert "crop or pad" in str(err.value)
    with pytest.raises(MediaError, match="max_aspect_ratio"):
        process_image(encode(Image.new("RGB", (4020, 20))), DEFAULTS)


def test_content_hash_depends_on_picture_and_resized_size():
    data = encode(Image.fromarray(noise(300, 200)))
    same = process_image(data, DEFAULTS).content_hash
    assert same == process_image(data, DEFAULTS).content_hash
    assert same != process_image(data, DEFAULTS.updated({"max_pixels": 50 * 28 * 28})).content_hash
    assert same != process_image(encode(Image.fromarray(noise(300, 200, seed=9))), DEFAULTS).content_hash
    image = Image.fromarray(noise(300, 200))
    assert process_image(image, DEFAULTS).content_hash == process_image(image.copy(), DEFAULTS).content_hash
    assert process_image(image, DEFAULTS, source_hash="x").content_hash != same


def test_load_image_from_data_url_and_local_file(tmp_path, hf):
    """Through the input processor's media steps (fetch, then preprocess), from each kind of source."""
    image = Image.fromarray(noise(120, 90))
    data = encode(image)
    (tmp_path / "a.png").write_bytes(data)
    policy = MediaPolicy(allowed_local_media_path=str(tmp_path))

    def load(source):
        return preprocess(fetch(MediaRef("image", source, "test"), policy, DEFAULTS))

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    from_url = load(url)
    from_file = load(str(tmp_path / "a.png"))
    assert from_url.content_hash == from_file.content_hash == load(data).content_hash
    assert_same_as(from_file, image, hf)
    assert_same_as(load(image), image, hf)


# ---- bad input


def test_corrupt_image_bytes():
    data = encode(Image.fromarray(noise(200, 200)))
    with pytest.raises(MediaError, match="send an intact image file"):
        open_image(data[: len(data) // 2], DEFAULTS)  # truncated PNG
    with pytest.raises(MediaError, match="send an intact image file"):
        open_image(data[:100] + bytes(len(data) - 100), DEFAULTS)  # zeroed body


@pytest.mark.parametrize("data", [b"just some text\n" * 10, b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", b""])
def test_unsupported_format(data):
    with pytest.raises(MediaError, match="not in a supported format; send one of: JPEG, .*PNG") as err:
        process_image(data, DEFAULTS)
    assert not isinstance(err.value, MediaTooLargeError)


def test_decompression_bomb_refused_before_decoding():
    data = png_header_only(30000, 30000)  # over Pillow's own limit too
    assert len(data) < 200
    start = time.perf_counter()
    with pytest.raises(MediaTooLargeError, match="Downscale it before sending"):
        open_image(data, DEFAULTS)
    assert time.perf_counter() - start < 0.5


def test_source_pixel_limit_checked_from_header():
    data = png_header_only(9000, 9000)  # 81 M pixels: over max_source_pixels (67 M), under Pillow's limit
    start = time.perf_counter()
    with pytest.raises(MediaTooLargeError, match=r"9000x9000 .* \(max_source_pixels\); downscale it"):
        process_image(data, DEFAULTS)
    with pytest.raises(MediaTooLargeError, match="max_source_pixels"):
        open_image(encode(Image.new("RGB", (2000, 1000))), MediaOptions(max_source_pixels=1000 * 1000))
    assert time.perf_counter() - start < 0.5


# ---- header-only probe


def exif_rotated_jpeg() -> bytes:
    # orientation 6 (rotate 90): neither we nor transformers' processor apply it, so the header size is the size
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(noise(300, 200)), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.fromarray(noise(90, 60, seed=i)).quantize(32) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


PROBED = {
    "png-rgb": lambda: encode(Image.fromarray(noise(640, 480))),
    "png-rgba": lambda: encode(rgba_with_transparency()),
    "png-palette": lambda: encode(palette_with_transparency()),
    "png-L": lambda: encode(Image.fromarray(noise(75, 40, channels=1), "L")),
    "png-1x1": lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9))),
    "png-28x5000": lambda: encode(Image.new("RGB", (28, 5000))),
    "png-4000x3000": lambda: encode(Image.new("RGB", (4000, 3000), (1, 2, 3))),
    "jpeg": lambda: encode(Image.fromarray(noise(333, 777)), "JPEG"),
    "jpeg-exif-rotated": exif_rotated_jpeg,
    "jpeg-progressive-cmyk": lambda: encode(Image.fromarray(noise(120, 80, channels=4), "CMYK"), "JPEG",
                                            progressive=True),
    "webp": lambda: encode(Image.fromarray(noise(200, 150)), "WEBP"),
    "webp-rgba": lambda: encode(rgba_with_transparency(), "WEBP", lossless=True),
    "gif-animated": animated_gif,
    "bmp": lambda: encode(Image.fromarray(noise(57, 31)), "BMP"),
    "tiff": lambda: encode(Image.fromarray(noise(1280, 720)), "TIFF"),
}


@pytest.mark.parametrize("options", [DEFAULTS, DEFAULTS.updated({"min_pixels": 256 * 784, "max_pixels": 512 * 784})],
                         ids=["defaults", "256-512"])
@pytest.mark.parametrize("name", sorted(PROBED))
def test_probe_equals_process(name, options):
    data = PROBED[name]()
    assert probe_image(data, options) == process_image(data, options).grid_thw


def test_exif_orientation_is_not_applied(hf):
    data = exif_rotated_jpeg()
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    item = process_image(data, DEFAULTS)
    assert probe_image(data, DEFAULTS) == item.grid_thw == image_resize(200, 300, DEFAULTS).grid_thw == (1, 14, 22)
    assert_same_as(item, Image.open(io.BytesIO(data)), hf)  # transformers does not rotate either


def test_image_resize_is_the_rule_process_image_uses():
    image = Image.fromarray(noise(333, 777))
    item = process_image(image, DEFAULTS)
    resize = image_resize(777, 333, DEFAULTS)
    assert (resize.height, resize.width) == smart_resize(777, 333, DEFAULTS.min_pixels, DEFAULTS.max_pixels, DEFAULTS.factor)
    assert resize.grid_thw == item.grid_thw == (1, resize.height // 14, resize.width // 14)


def test_probe_refuses_a_huge_header_without_decoding():
    data = png_header_only(9000, 9000)
    start = time.perf_counter()
    with pytest.raises(MediaTooLargeError, match=r"9000x9000 .* \(max_source_pixels\); downscale it"):
        probe_image(data, DEFAULTS)
    with pytest.raises(MediaTooLargeError, match="Downscale it before sending"):
        probe_image(png_header_only(30000, 30000), DEFAULTS)  # Pillow's own bomb limit
    assert time.perf_counter() - start < 0.5
    # under the limit, a header whose pixel data is missing still probes: its size is all the probe reads
    assert probe_image(png_header_only(4000, 4000), DEFAULTS) == image_resize(4000, 4000, DEFAULTS).grid_thw


@pytest.mark.parametrize("data, error, message", [
    (b"just some text\n" * 10, MediaError, "not in a supported format; send one of: JPEG"),
    (b"", MediaError, "not in a supported format"),
    (encode(Image.new("RGB", (4020, 20))), MediaError, "max_aspect_ratio"),
    (encode(Image.new("RGB", (8, 8)), "ICO"), MediaError, "not in a supported format"),  # not in FORMATS
])
def test_probe_refuses_what_process_image_refuses(data, error, message):
    for call in (probe_image, process_image):
        with pytest.raises(error, match=message):
            call(data, DEFAULTS)


def test_probe_reads_no_pixels():
    data = encode(Image.new("RGB", (4000, 4000), (200, 10, 10)))  # compresses to a few kB; decoded: 48 MB
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        start = time.perf_counter()
        grid = probe_image(data, DEFAULTS)
        probe_s = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, f"probe_image allocated {peak:,} bytes"
    start = time.perf_counter()
    assert process_image(data, DEFAULTS).grid_thw == grid
    assert probe_s * 20 < time.perf_counter() - start


def test_a_request_cannot_upscale_a_tiny_image_past_the_server_limit():
    tiny = encode(Image.new("RGB", (1, 1)))
    with pytest.raises(MediaError, match="over the server's"):
        DEFAULTS.tightened({"min_pixels": 3e8, "max_pixels": 3e8})
    t, h, w = probe_image(tiny, DEFAULTS.tightened({"min_pixels": DEFAULTS.max_pixels}))  # the most it may ask
    assert h * w * 14 * 14 <= DEFAULTS.max_pixels
