"""Image preprocessing on one CPU thread: vlserve's process_image vs transformers' Qwen2VLImageProcessorPil.

Same 1280x720 picture, same run, runs interleaved (so machine noise hits both alike), median after warm-up.
Run: python benchmarks/preprocess.py [--runs 50]
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load their thread pools

import argparse
import datetime
import platform
import statistics
import time

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlserve.media.image import process_image, smart_resize
from vlserve.media.options import MediaOptions


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photographic-like: smooth colour gradients, a soft highlight, sensor-like noise; fixed seed."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    blob = np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.02)
    rgb = np.stack(
        np.broadcast_arrays(200 * x + 30, 160 * y + 50 * np.sin(6 * x) + 40, 120 * (1 - x * y) + 90 * blob),
        axis=-1,
    )
    rgb = rgb + np.random.default_rng(seed).normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    image, options = photo(1280, 720), MediaOptions()
    hf = Qwen2VLImageProcessorPil(
        min_pixels=options.min_pixels, max_pixels=options.max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    ours_fn = lambda: process_image(image, options)  # noqa: E731
    hf_fn = lambda: hf(images=image, return_tensors="np")  # noqa: E731
    height, width = smart_resize(image.height, image.width, options.min_pixels, options.max_pixels, options.factor)
    resize_fn = lambda: image.resize((width, height), Image.Resampling.BICUBIC)  # noqa: E731

    item, ref = ours_fn(), hf_fn()
    assert item.grid_thw == tuple(int(v) for v in ref["image_grid_thw"][0])
    diff = float(np.abs(item.pixel_values.numpy() - ref["pixel_values"]).max())
    assert diff <= 1e-5, f"outputs differ: max abs diff {diff}"

    fns = {"vlserve process_image": ours_fn, "transformers Qwen2VLImageProcessorPil": hf_fn, "PIL resize": resize_fn}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(args.warmup + args.runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    ours_ms, hf_ms, resize_ms = (statistics.median(t) for t in times.values())

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores visible, 1 thread used; {platform.platform()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}; {datetime.date.today()}"
    )
    print(
        f"image: 1280x720 RGB -> {width}x{height}, grid {item.grid_thw}, {item.num_tokens} tokens; "
        f"median of {args.runs} runs after {args.warmup} warm-up, interleaved"
    )
    print(f"transformers Qwen2VLImageProcessorPil: {hf_ms:7.2f} ms")
    print(f"vlserve process_image:                 {ours_ms:7.2f} ms  ({hf_ms / ours_ms:.2f}x faster)")
    print(f"  of which Pillow bicubic resize alone: {resize_ms:6.2f} ms  (the same call inside both)")
    print(f"outputs: max abs diff {diff:g} ({'bit-identical' if diff == 0 else 'within 1e-5'})")


if __name__ == "__main__":
    main()
