"""Test media made on the fly with PyAV, so decoding in the tests is real decoding."""

import io
import os
import struct
import tempfile
import zlib
from fractions import Fraction
from typing import Callable

import av
import numpy as np

# libx264 at qp 0 is lossless, so identical input frames decode identically; mpeg4 is the fallback
# that every FFmpeg build has.
DEFAULT_CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"

Paint = Callable[[int, int, int], np.ndarray]  # (frame index, width, height) -> (height, width, 3) uint8


def moving_pattern(index: int, width: int, height: int) -> np.ndarray:
    """A gradient that shifts with the frame index plus a bright square that moves: every frame differs."""
    ys, xs = np.mgrid[0:height, 0:width]
    frame = np.stack([(xs * 3 + index * 7) % 256, (ys * 5 + index * 11) % 256, np.full_like(xs, index * 13 % 256)], -1)
    side = max(2, min(width, height) // 4)
    x0 = index * 3 % max(1, width - side)
    frame[:side, x0 : x0 + side] = 255
    return frame.astype(np.uint8)


def solid_colours(colours: list[tuple[int, int, int]]) -> Paint:
    """Frame i is filled with colours[i] (cycling), to follow frames into patches."""
    def paint(index: int, width: int, height: int) -> np.ndarray:
        return np.broadcast_to(np.array(colours[index % len(colours)], np.uint8), (height, width, 3)).copy()
    return paint


def _write(target, width: int, height: int, frames: int, fps: float, codec: str, container: str,
           paint: Paint, container_options: dict[str, str]) -> None:
    with av.open(target, "w", format=container, options=container_options) as out:
        options = {"qp": "0"} if codec == "libx264" else {}
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(paint(i, width, height), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def make_video_bytes(width: int, height: int, frames: int, fps: float, codec: str = DEFAULT_CODEC,
                     container: str = "mp4", paint: Paint = moving_pattern, faststart: bool = False) -> bytes:
    """Encode `frames` frames of `paint` at `fps` (use even sides: yuv420p needs them). `faststart` puts the
    mp4 header (moov) before the frame data, so a cut file still opens and promises every frame."""
    if not faststart:
        buf = io.BytesIO()
        _write(buf, width, height, frames, fps, codec, container, paint, {})
        return buf.getvalue()
    # faststart rewrites the file after writing, which needs a real, seekable file
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        _write(path, width, height, frames, fps, codec, "mp4", paint, {"movflags": "faststart"})
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.remove(path)


def frame_data_offset(mp4: bytes) -> int:
    """Where the frame data (the mdat payload) of a faststart mp4 starts: cut there, no frame is left."""
    return mp4.index(b"mdat") + 4


def make_audio_only_bytes() -> bytes:
    """A valid mp4 with one AAC audio stream and no video stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height: decoding it would allocate width*height*3 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
