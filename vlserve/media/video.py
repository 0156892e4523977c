"""Video input: decode with PyAV, sample and resize frames as qwen-vl-utils does, then patchify.

Frame sampling and pixel budgets follow qwen-vl-utils 0.0.14 (`smart_nframes`, `fetch_video`). Resizing uses
PIL's bicubic filter; qwen-vl-utils and transformers use torchvision's bicubic (antialiased) resize, so pixel
values can differ by interpolation rounding while sizes, grids and token counts are identical.

Contracts:
- `probe_video(data, options)` gives the grid_thw `process_video(data, options)` would produce, from the
  container alone (frame rate, frame count, frame size; packets may be counted, no frame is decoded), and
  raises what process_video raises before decoding (unreadable file, no video stream, no decoder,
  max_source_pixels, too many frames, too few frames, max_aspect_ratio). It trusts the container: when the
  stored frame count is wrong (a cut upload) or the frames' size differs from the stream's, process_video
  ends with another grid (it re-samples over the frames it really decodes), or fails ("no decodable frames").
  Either way the options bound the result: at most max_frames frames, each within the per-frame budget.
  A caller that admits work by the probe must re-check the item process_video returns.
- Works with PyAV 18 and 19+ (19 dropped `av.open`'s metadata_errors keyword): see `_av_open`.
"""

import io
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import av
import numpy as np
import torch
from PIL import Image

from vlserve.errors import MediaError, MediaTooLargeError
from vlserve.media.fetch import content_hash
from vlserve.media.image import normalize_patches, patchify, smart_resize
from vlserve.media.item import MediaItem
from vlserve.media.options import MediaOptions

# Bound on frames decoded from one video, counting included: a tiny file can hold a huge number of
# near-empty frames, and every one must be decoded to reach the ones we keep. ~55 minutes at 30 fps.
MAX_SOURCE_FRAMES = 100_000
NO_FRAMES = "the video has no decodable frames; send a complete, playable video file"


def smart_nframes(total_frames: int, video_fps: float, options: MediaOptions) -> int:
    """How many frames to sample: `fps` frames per second of video, clamped to [min_frames, max_frames] and to
    the frames the video has, then floored to a multiple of the temporal patch (qwen-vl-utils `smart_nframes`)."""
    step = options.temporal_patch_size  # frames go to the vision tower in groups of this: counts are multiples
    min_frames = _ceil_to(options.min_frames, step)
    max_frames = _floor_to(min(options.max_frames, total_frames), step)
    wanted = total_frames / video_fps * options.fps
    # min() last: a video shorter than min_frames gives all of its frames (a whole number of temporal patches)
    nframes = _floor_to(min(max(wanted, min_frames), max_frames), step)
    if nframes >= step:
        return nframes
    if total_frames < step:
        raise MediaError(
            f"the video has {total_frames} frame(s); a video needs at least {step}: "
            "send a longer video, or send a single frame as an image"
        )
    raise MediaError(
        f"mm_processor_kwargs max_frames is {options.max_frames}; it must be at least {step}"
    )


def frame_indices(total_frames: int, nframes: int) -> list[int]:
    """Evenly spaced frame indices, first and last included (qwen-vl-utils' torch.linspace(...).round())."""
    return torch.linspace(0, total_frames - 1, nframes).round().long().tolist()


def frame_max_pixels(nframes: int, options: MediaOptions) -> float:
    """Per-frame pixel ceiling: the total budget shared over the frames, but never below 1.05x the per-frame
    minimum (so smart_resize has room) nor above video_max_pixels (qwen-vl-utils `fetch_video`)."""
    shared = options.video_total_pixels / nframes * options.temporal_patch_size
    return min(options.video_max_pixels, max(shared, int(options.video_min_pixels * 1.05)))


def probe_video(data: bytes, options: MediaOptions) -> tuple[int, int, int]:
    """grid_thw that `process_video(data, options)` would give if the container tells the truth, read from the
    container without decoding frames (see the module docstring for when the two differ)."""
    info = _probe(data, options)
    nframes = smart_nframes(info.frames, info.fps, options)
    width, height = (info.width, info.height) if info.width and info.height else _first_frame_size(data, options)
    height, width = _frame_size(height, width, frame_max_pixels(nframes, options), options)
    return nframes // options.temporal_patch_size, height // options.patch_size, width // options.patch_size


def process_video(data: bytes, options: MediaOptions, source_hash: str | None = None) -> MediaItem:
    """Decode `data`, sample and resize frames, and patchify them. `source_hash` saves re-hashing the bytes
    when the caller already has their hash."""
    info = _probe(data, options)
    video_fps, claimed_frames = info.fps, info.frames
    sampled = _sample(data, claimed_frames, video_fps, options)
    if sampled.decoded != claimed_frames:
        # The container's frame count was wrong (a truncated upload, a careless muxer): decoding has counted
        # the frames for real, so sample again from that count. Once suffices: the count is exact now.
        sampled = _sample(data, sampled.decoded, video_fps, options)
    pixels = np.stack(sampled.frames)  # (T, H, W, 3) uint8
    patches, grid_thw = patchify(pixels.transpose(0, 3, 1, 2), options)  # uint8: cheaper to move than float32
    sample_fps = len(sampled.indices) / sampled.decoded * video_fps
    height, width = pixels.shape[1:3]
    digest = content_hash("video", source_hash or content_hash(data), str(sampled.indices), f"{height}x{width}")
    return MediaItem(
        modality="video",
        pixel_values=normalize_patches(patches, options),
        grid_thw=grid_thw,
        content_hash=digest,
        second_per_grid_t=options.temporal_patch_size / sample_fps,
        frame_seconds=frame_seconds(sampled.indices, video_fps, options.temporal_patch_size),
        merge_size=options.merge_size,
    )


def frame_seconds(indices: list[int], video_fps: float, temporal_patch: int) -> tuple[float, ...]:
    """Each temporal patch's time: the mean of its first and last frame's (Qwen3-VL's prompt timestamps)."""
    seconds = [i / video_fps for i in indices]
    return tuple((seconds[i] + seconds[i + temporal_patch - 1]) / 2 for i in range(0, len(seconds), temporal_patch))


@dataclass
class _Sampled:
    frames: list[np.ndarray]  # resized (H, W, 3) uint8, in index order
    indices: list[int]
    decoded: int  # frames the stream really holds


def _sample(data: bytes, total_frames: int, video_fps: float, options: MediaOptions) -> _Sampled:
    nframes = smart_nframes(total_frames, video_fps, options)
    indices = frame_indices(total_frames, nframes)
    frames, decoded = _decode_kept(data, indices, frame_max_pixels(nframes, options), options)
    if decoded == 0:
        raise MediaError(NO_FRAMES)
    return _Sampled(frames, indices, decoded)


# av.open keywords, dropped the first time PyAV refuses them (PyAV 19 removed metadata_errors)
_AV_OPEN_KWARGS = {"metadata_errors": "replace"}  # a title in a legacy encoding must not make the video unreadable


def _av_open(data: bytes) -> av.container.InputContainer:
    """av.open on `data`, with metadata_errors where this PyAV has it (feature-detected on first use)."""
    global _AV_OPEN_KWARGS
    kwargs = _AV_OPEN_KWARGS
    if kwargs:
        try:
            return av.open(io.BytesIO(data), **kwargs)
        except TypeError as e:
            if "metadata_errors" not in str(e):
                raise
            _AV_OPEN_KWARGS = {}  # an unknown keyword: this PyAV (19+) decodes metadata leniently on its own
    return av.open(io.BytesIO(data))


@contextmanager
def _open(data: bytes) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    try:
        container = _av_open(data)
    except av.FFmpegError as e:
        raise MediaError(f"could not read the video ({e}); send an mp4, webm, mkv or mov file") from e
    with container:
        if not container.streams.video:
            raise MediaError("the file has no video stream; send a video, or send pictures as images")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for it
            raise MediaError("the video's codec cannot be decoded here; re-encode it as H.264, VP9 or AV1")
        yield container, stream


class _StreamInfo(NamedTuple):
    fps: float
    frames: int  # as the container says (or its packets, counted)
    width: int  # as the stream's header says; 0 if it does not say
    height: int


def _probe(data: bytes, options: MediaOptions) -> _StreamInfo:
    """What the container says of its first video stream, refusing oversize frames before any decoding."""
    with _open(data) as (container, stream):
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_source_size(width, height, options)
        total_frames = stream.frames or _count_packets(container, stream)
        _check_frame_count(total_frames)
        fps = _stream_fps(stream, container, total_frames, options)
        return _StreamInfo(fps, total_frames, width, height)


def _first_frame_size(data: bytes, options: MediaOptions) -> tuple[int, int]:
    """(width, height) of the first decodable frame, for the rare stream whose header lacks its frame size."""
    with _open(data) as (container, stream):
        for frame in _frames(container, stream):
            _check_source_size(frame.width, frame.height, options)
            return frame.width, frame.height
    raise MediaError(NO_FRAMES)


def _stream_fps(stream: av.VideoStream, container: av.container.InputContainer, total_frames: int,
                options: MediaOptions) -> float:
    """The stream's average frame rate, else its frames over its duration; a stream with neither is taken
    as sampled at `fps` already, so every frame is kept (up to max_frames)."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and rate > 0:
            return float(rate)
    seconds = container.duration / av.time_base if container.duration else 0.0
    return total_frames / seconds if seconds > 0 and total_frames else options.fps


def _count_packets(container: av.container.InputContainer, stream: av.VideoStream) -> int:
    """Frame count for containers that don't store one (webm, mkv): one packet per frame, no decoding."""
    return sum(1 for packet in _packets(container, stream) if packet.size)


def _check_source_size(width: int, height: int, options: MediaOptions) -> None:
    if width * height > options.max_source_pixels:
        raise MediaTooLargeError(
            f"video frames are {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{options.max_source_pixels:,} (max_source_pixels); downscale the video before sending"
        )


def _check_frame_count(frames: int) -> None:
    if frames > MAX_SOURCE_FRAMES:
        raise MediaTooLargeError(f"the video has more than {MAX_SOURCE_FRAMES:,} frames; send a shorter clip")


def _decode_kept(data: bytes, indices: list[int], max_pixels: float,
                 options: MediaOptions) -> tuple[list[np.ndarray], int]:
    """Decode the whole stream in order, keeping (resized) only the frames at `indices`; returns them and the
    number of frames decoded. Earlier frames must be decoded anyway to reach later ones in most codecs."""
    kept, position, decoded, size = [], 0, 0, None
    with _open(data) as (container, stream):
        stream.thread_type = "AUTO"
        for decoded, frame in enumerate(_frames(container, stream), 1):
            _check_frame_count(decoded)
            _check_source_size(frame.width, frame.height, options)
            while position < len(indices) and indices[position] == decoded - 1:
                # one size for all frames, from the first kept one, even if the stream changes resolution
                if size is None:
                    height, width = _frame_size(frame.height, frame.width, max_pixels, options)
                    size = (width, height)  # PIL's order
                kept.append(np.asarray(frame.to_image().resize(size, Image.Resampling.BICUBIC)))
                position += 1
    return kept, decoded


def _frame_size(height: int, width: int, max_pixels: float, options: MediaOptions) -> tuple[int, int]:
    """Resized (height, width) of a frame: sides multiples of options.factor, area within the per-frame budget."""
    return smart_resize(
        height, width, min_pixels=options.video_min_pixels, max_pixels=max_pixels,
        factor=options.factor, max_aspect_ratio=options.max_aspect_ratio,
    )


def _packets(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.Packet]:
    """Demuxed packets; a read error ends the stream, so a truncated or damaged upload keeps what came before."""
    try:
        yield from container.demux(stream)
    except av.FFmpegError:
        return


def _frames(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    for packet in _packets(container, stream):
        try:
            yield from packet.decode()
        except av.FFmpegError:
            continue  # a damaged packet: skip it and go on, as FFmpeg's own tools do


def _ceil_to(n: float, step: int) -> int:
    return math.ceil(n / step) * step


def _floor_to(n: float, step: int) -> int:
    return math.floor(n / step) * step
