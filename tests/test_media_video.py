"""Video preprocessing follows qwen-vl-utils (frame counts, indices, pixel budgets, sample fps) on videos that
PyAV really encodes and decodes; bad videos fail with typed errors that say what to change."""

import io
from dataclasses import replace
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from media_samples import frame_data_offset, make_audio_only_bytes, make_video_bytes, moving_pattern, solid_colours
from vlserve.errors import MediaError, MediaTooLargeError
from vlserve.inputs.media import fetch, preprocess
from vlserve.media import video
from vlserve.media.fetch import MediaPolicy
from vlserve.media.image import process_image
from vlserve.media.options import CLIP_MEAN, CLIP_STD, MediaOptions
from vlserve.media.template import MediaRef
from vlserve.media.video import (
    frame_indices,
    frame_max_pixels,
    probe_video,
    process_video,
    smart_nframes,
)

DEFAULTS = MediaOptions()
SMALL = MediaOptions(video_min_pixels=4 * 28 * 28)  # keeps tiny test frames tiny


GREY_STEP = 6  # far above codec rounding (+-2), small enough for 42 frames


def grey_ramp(frames: int):
    """Frame i is grey level GREY_STEP*i: the sampled frame indices can be read back from the pixels."""
    return solid_colours([(GREY_STEP * i,) * 3 for i in range(frames)])


def sampled_indices(item) -> list[int]:
    return np.round(np.array(frame_levels(item)) / GREY_STEP).astype(int).tolist()


def frame_levels(item) -> list[float]:
    """Red channel (0..255) of each sampled frame, in order, read from the first patch of each temporal step."""
    t, h, w = item.grid_thw
    patches = item.pixel_values.view(t, h * w, 3, 2, -1)[:, 0, 0, :, 0]  # (grid_t, temporal slot)
    return (patches * CLIP_STD[0] + CLIP_MEAN[0]).mul(255).flatten().tolist()


# --- frame counts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total, video_fps, overrides, expected",
    [
        (30, 10, {}, 6),  # 3 s at 2 fps
        (25, 10, {}, 4),  # 5 wanted: odd counts floor to even (qwen-vl-utils 0.0.14)
        (35, 10, {}, 6),  # 7 wanted -> 6
        (10, 30, {}, 4),  # 0.33 s: raised to min_frames
        (3, 30, {}, 2),  # shorter than min_frames: every frame it has, made even
        (30_000, 30, {}, 768),  # 1000 s: capped at max_frames
        (30_000, 30, {"max_frames": 9}, 8),  # max_frames floors to even
        (20, 10, {"min_frames": 5}, 6),  # min_frames ceils to even
        (40, 4, {"fps": 1.0}, 10),
        (40, 4, {"fps": 0.1}, 4),
    ],
)
def test_smart_nframes(total, video_fps, overrides, expected):
    assert smart_nframes(total, video_fps, DEFAULTS.updated(overrides)) == expected


def test_smart_nframes_refuses_fewer_than_two_frames():
    with pytest.raises(MediaError, match="send a longer video, or send a single frame as an image"):
        smart_nframes(1, 30, DEFAULTS)
    with pytest.raises(MediaError, match="mm_processor_kwargs max_frames is 1; it must be at least 2"):
        smart_nframes(100, 30, DEFAULTS.updated({"max_frames": 1, "min_frames": 1}))


def test_frame_indices_are_evenly_spaced_with_both_ends():
    assert frame_indices(30, 6) == [0, 6, 12, 17, 23, 29]
    assert frame_indices(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "frames, fps, overrides, nframes",
    [(30, 10, {}, 6), (9, 5, {}, 4), (3, 3, {}, 2), (40, 4, {"fps": 1.0}, 10), (30, 10, {"max_frames": 4}, 4)],
)
def test_decoded_video_samples_the_expected_frames(frames, fps, overrides, nframes):
    item = process_video(make_video_bytes(56, 56, frames, fps, paint=grey_ramp(frames)), SMALL.updated(overrides))
    assert item.grid_thw[0] == nframes // 2
    assert sampled_indices(item) == frame_indices(frames, nframes)


def test_frame_count_missing_from_container_is_counted():
    # Matroska stores no frame count: the packets are counted instead
    data = make_video_bytes(56, 56, 30, 10, container="matroska", paint=grey_ramp(30))
    assert av.open(io.BytesIO(data)).streams.video[0].frames == 0
    item = process_video(data, SMALL)
    assert item.grid_thw[0] == 3 and item.second_per_grid_t == pytest.approx(1.0)


def test_wrong_frame_count_is_corrected_by_decoding():
    # a faststart mp4 cut short still promises 30 frames; only 29 decode
    data = make_video_bytes(56, 56, 30, 10, paint=grey_ramp(30), faststart=True)
    cut = data[: len(data) - 20]
    assert av.open(io.BytesIO(cut)).streams.video[0].frames == 30
    item = process_video(cut, SMALL)
    assert sampled_indices(item) == frame_indices(29, 4)  # 2.9 s -> 5.8 frames -> min 4 -> 4, sampled over the real 29
    assert item.second_per_grid_t == pytest.approx(2 / (4 / 29 * 10))


def test_fps_fallbacks():
    container = SimpleNamespace(duration=3 * av.time_base)
    no_rate = SimpleNamespace(average_rate=None, guessed_rate=0)
    assert video._stream_fps(no_rate, container, 60, DEFAULTS) == 20  # frames over duration
    no_duration = SimpleNamespace(duration=None)
    assert video._stream_fps(no_rate, no_duration, 60, DEFAULTS.updated({"fps": 3})) == 3  # keep every frame


def test_mpeg4_decodes_like_h264():
    assert process_video(make_video_bytes(84, 56, 30, 10, codec="mpeg4"), DEFAULTS).grid_thw == (3, 20, 28)


# --- pixel budgets, timing, tokens ----------------------------------------------------------------------------


def test_frame_max_pixels():
    assert frame_max_pixels(6, DEFAULTS) == DEFAULTS.video_max_pixels  # per-frame cap binds
    assert frame_max_pixels(768, DEFAULTS) == DEFAULTS.video_total_pixels / 768 * 2  # total budget binds
    tiny_total = DEFAULTS.updated({"video_total_pixels": 1000})
    assert frame_max_pixels(4, tiny_total) == int(DEFAULTS.video_min_pixels * 1.05)  # never below min * 1.05


@pytest.mark.parametrize(
    "overrides, grid_hw",
    [
        ({}, (20, 28)),  # 320x240 is under video_min_pixels: grown to 392x280
        ({"video_min_pixels": 3136, "video_max_pixels": 20 * 784}, (6, 10)),  # per-frame cap: 140x84
        ({"video_min_pixels": 3136, "video_total_pixels": 4 * 20 * 784 // 2}, (6, 10)),  # total over 4 frames
        ({"video_min_pixels": 3136, "video_total_pixels": 1000}, (2, 4)),  # floor of min*1.05 = 3292: 56x28
    ],
)
def test_pixel_budgets(overrides, grid_hw):
    item = process_video(make_video_bytes(320, 240, 8, 4), DEFAULTS.updated(overrides))  # 2 s -> 4 frames
    assert item.grid_thw == (2, *grid_hw)
    assert item.pixel_values.shape == (2 * grid_hw[0] * grid_hw[1], 3 * 2 * 14 * 14)
    assert item.pixel_values.dtype == torch.float32
    assert item.num_tokens == 2 * grid_hw[0] * grid_hw[1] // 4


@pytest.mark.parametrize("frames, fps, expected", [(30, 10, 1.0), (25, 10, 1.25), (40, 4, 1.0), (9, 5, 0.9)])
def test_second_per_grid_t_is_temporal_patch_over_sample_fps(frames, fps, expected):
    # sample_fps = nframes / total_frames * video_fps, as qwen-vl-utils returns it
    item = process_video(make_video_bytes(56, 56, frames, fps), SMALL)
    assert item.second_per_grid_t == pytest.approx(expected)


def test_content_hash_follows_source_and_sampling():
    data = make_video_bytes(56, 56, 30, 10)
    first = process_video(data, SMALL)
    assert process_video(data, SMALL).content_hash == first.content_hash
    assert process_video(data, SMALL.updated({"fps": 1})).content_hash != first.content_hash  # other frames
    assert process_video(data, DEFAULTS).content_hash != first.content_hash  # other size
    assert process_video(make_video_bytes(56, 56, 30, 10, paint=grey_ramp(30)), SMALL).content_hash != first.content_hash
    assert process_video(data, SMALL, source_hash="abc").content_hash != first.content_hash


# --- patch layout ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(336, 308), (84, 56)])  # kept as is; resized
def test_still_video_equals_its_frame_as_an_image(width, height):
    data = make_video_bytes(width, height, 8, 4, paint=lambda i, w, h: moving_pattern(0, w, h))
    item = process_video(data, DEFAULTS)
    frame = next(av.open(io.BytesIO(data)).decode(video=0)).to_image()
    budget = frame_max_pixels(4, DEFAULTS)
    image = process_image(frame, DEFAULTS.updated({"min_pixels": DEFAULTS.video_min_pixels, "max_pixels": budget}))
    assert item.grid_thw == (2, *image.grid_thw[1:])
    assert torch.equal(item.pixel_values, torch.cat([image.pixel_values] * 2))


def test_consecutive_frames_fill_the_temporal_slots_in_order():
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250), (250, 0, 250)]
    data = make_video_bytes(56, 84, 6, 2, paint=solid_colours(colours))  # 3 s at 2 fps: all 6 frames
    item = process_video(data, SMALL)
    t, h, w = item.grid_thw
    assert t == 3
    decoded = [f.to_ndarray(format="rgb24")[0, 0] / 255 for f in av.open(io.BytesIO(data)).decode(video=0)]
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    patches = item.pixel_values.view(t, h * w, 3, 2, 14 * 14).numpy()
    for step in range(t):
        for slot in range(2):
            expected = (decoded[2 * step + slot] - mean) / std
            np.testing.assert_allclose(patches[step, :, :, slot, :], np.broadcast_to(expected[None, :, None],
                                       (h * w, 3, 196)), atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------------------


def test_random_bytes():
    with pytest.raises(MediaError, match="could not read the video .*send an mp4, webm, mkv or mov file"):
        process_video(np.random.default_rng(0).bytes(5000), DEFAULTS)


def test_truncated_mp4():
    data = make_video_bytes(56, 56, 30, 10)  # header (moov) at the end: cut off
    with pytest.raises(MediaError, match="could not read the video"):
        process_video(data[: len(data) // 2], DEFAULTS)


def test_audio_only_container():
    with pytest.raises(MediaError, match="no video stream; send a video"):
        process_video(make_audio_only_bytes(), DEFAULTS)


def test_video_without_frames():
    data = make_video_bytes(56, 56, 30, 10, faststart=True)
    with pytest.raises(MediaError, match="no decodable frames; send a complete, playable video"):
        process_video(data[: frame_data_offset(data)], DEFAULTS)


def test_single_frame_video():
    with pytest.raises(MediaError, match="has 1 frame.*send a single frame as an image"):
        process_video(make_video_bytes(56, 56, 1, 10), DEFAULTS)


def test_oversize_frames_refused_before_decoding():
    data = make_video_bytes(320, 240, 30, 10, faststart=True)
    header_only = data[: frame_data_offset(data)]  # decoding would fail with "no decodable frames"
    with pytest.raises(MediaTooLargeError, match=r"320x240 = 76,800 pixels.*\(max_source_pixels\); downscale"):
        process_video(header_only, replace(DEFAULTS, max_source_pixels=320 * 240 - 1))  # a server limit


def test_too_many_frames(monkeypatch):
    monkeypatch.setattr(video, "MAX_SOURCE_FRAMES", 20)
    with pytest.raises(MediaTooLargeError, match="more than 20 frames; send a shorter clip"):
        process_video(make_video_bytes(56, 56, 30, 10), DEFAULTS)


def test_aspect_ratio_over_limit():
    with pytest.raises(MediaError, match=r"aspect ratio 1.5 is over the limit of 1.2 \(max_aspect_ratio\)"):
        process_video(make_video_bytes(84, 56, 8, 4), replace(DEFAULTS, max_aspect_ratio=1.2))  # a server limit


def test_load_video_local_file_within_allowed_root(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    data = make_video_bytes(56, 56, 30, 10)
    (root / "clip.mp4").write_bytes(data)
    (tmp_path / "outside.mp4").write_bytes(data)
    policy = MediaPolicy(allowed_local_media_path=str(root))

    def load_video(source):  # the input processor's media steps: fetch, then preprocess
        return preprocess(fetch(MediaRef("video", source, "test"), policy, SMALL))

    assert load_video(str(root / "clip.mp4")).content_hash == process_video(data, SMALL).content_hash
    assert load_video(data).grid_thw == (3, 4, 4)
    with pytest.raises(MediaError, match=r"outside the folder the server allows \(--allowed-local-media-path\)"):
        load_video(str(tmp_path / "outside.mp4"))


# --- header-only probe ----------------------------------------------------------------------------------------

# the videos the tests above build, with the options they use
PROBED = {
    "h264-56x56-30@10": (lambda: make_video_bytes(56, 56, 30, 10), SMALL),
    "h264-56x56-30@10-defaults": (lambda: make_video_bytes(56, 56, 30, 10), DEFAULTS),
    "h264-9@5": (lambda: make_video_bytes(56, 56, 9, 5), SMALL),
    "h264-3@3": (lambda: make_video_bytes(56, 56, 3, 3), SMALL),
    "h264-40@4-fps1": (lambda: make_video_bytes(56, 56, 40, 4), SMALL.updated({"fps": 1.0})),
    "h264-max_frames4": (lambda: make_video_bytes(56, 56, 30, 10), SMALL.updated({"max_frames": 4})),
    "matroska-no-frame-count": (lambda: make_video_bytes(56, 56, 30, 10, container="matroska"), SMALL),
    "mpeg4-84x56": (lambda: make_video_bytes(84, 56, 30, 10, codec="mpeg4"), DEFAULTS),
    "320x240-defaults": (lambda: make_video_bytes(320, 240, 8, 4), DEFAULTS),
    "320x240-per-frame-cap": (lambda: make_video_bytes(320, 240, 8, 4),
                              DEFAULTS.updated({"video_min_pixels": 3136, "video_max_pixels": 20 * 784})),
    "320x240-total-budget": (lambda: make_video_bytes(320, 240, 8, 4),
                             DEFAULTS.updated({"video_min_pixels": 3136, "video_total_pixels": 4 * 20 * 784 // 2})),
    "320x240-min-floor": (lambda: make_video_bytes(320, 240, 8, 4),
                          DEFAULTS.updated({"video_min_pixels": 3136, "video_total_pixels": 1000})),
    "336x308-still": (lambda: make_video_bytes(336, 308, 8, 4, paint=lambda i, w, h: moving_pattern(0, w, h)),
                      DEFAULTS),
    "56x84-6@2": (lambda: make_video_bytes(56, 84, 6, 2), SMALL),
    "faststart-complete": (lambda: make_video_bytes(56, 56, 30, 10, faststart=True), SMALL),
}


@pytest.mark.parametrize("name", sorted(PROBED))
def test_probe_equals_process(name):
    make, options = PROBED[name]
    data = make()
    assert probe_video(data, options) == process_video(data, options).grid_thw


def test_probe_decodes_no_frame(monkeypatch):
    data = make_video_bytes(320, 240, 30, 10, faststart=True)
    header_only = data[: frame_data_offset(data)]  # no frame data at all: only the container's word
    assert probe_video(header_only, DEFAULTS) == probe_video(data, DEFAULTS) == (3, 20, 28)
    monkeypatch.setattr(av.Packet, "decode", None, raising=False)  # any decode would fail now
    assert probe_video(data, DEFAULTS) == (3, 20, 28)


def test_probe_trusts_the_container_where_process_decodes():
    # documented disagreements: the caller re-checks the item that process_video returns
    data = make_video_bytes(56, 56, 30, 10, paint=grey_ramp(30), faststart=True)
    cut = data[: len(data) - 20]  # promises 30 frames (3 s: 6 sampled), 29 decode (2.9 s: 4 sampled)
    assert probe_video(cut, SMALL) == (3, 4, 4)
    assert process_video(cut, SMALL).grid_thw == (2, 4, 4)
    header_only = data[: frame_data_offset(data)]
    assert probe_video(header_only, SMALL) == (3, 4, 4)
    with pytest.raises(MediaError, match="no decodable frames"):
        process_video(header_only, SMALL)


def test_probe_without_frame_size_in_the_header_reads_the_first_frame(monkeypatch):
    data = make_video_bytes(84, 56, 30, 10)
    real_probe = video._probe
    monkeypatch.setattr(video, "_probe", lambda d, o: real_probe(d, o)._replace(width=0, height=0))
    assert probe_video(data, DEFAULTS) == process_video(data, DEFAULTS).grid_thw == (3, 20, 28)
    cut = make_video_bytes(56, 56, 30, 10, faststart=True)
    with pytest.raises(MediaError, match="no decodable frames"):
        probe_video(cut[: frame_data_offset(cut)], DEFAULTS)


@pytest.mark.parametrize("make, options, error, message", [
    (lambda: np.random.default_rng(0).bytes(5000), DEFAULTS, MediaError, "could not read the video"),
    (make_audio_only_bytes, DEFAULTS, MediaError, "no video stream; send a video"),
    (lambda: make_video_bytes(56, 56, 1, 10), DEFAULTS, MediaError, "send a single frame as an image"),
    (lambda: make_video_bytes(320, 240, 30, 10), replace(DEFAULTS, max_source_pixels=320 * 240 - 1),
     MediaTooLargeError, r"320x240 = 76,800 pixels.*\(max_source_pixels\)"),
    (lambda: make_video_bytes(84, 56, 8, 4), replace(DEFAULTS, max_aspect_ratio=1.2), MediaError,
     r"aspect ratio 1.5 is over the limit of 1.2 \(max_aspect_ratio\)"),
    (lambda: make_video_bytes(56, 56, 30, 10), DEFAULTS.updated({"max_frames": 1, "min_frames": 1}), MediaError,
     "max_frames is 1; it must be at least 2"),
])
def test_probe_refuses_what_process_refuses(make, options, error, message):
    data = make()
    for call in (probe_video, process_video):
        with pytest.raises(error, match=message):
            call(data, options)


def test_probe_refuses_too_many_frames(monkeypatch):
    monkeypatch.setattr(video, "MAX_SOURCE_FRAMES", 20)
    for data in (make_video_bytes(56, 56, 30, 10), make_video_bytes(56, 56, 30, 10, container="matroska")):
        with pytest.raises(MediaTooLargeError, match="more than 20 frames; send a shorter clip"):
            probe_video(data, DEFAULTS)


def test_a_request_cannot_ask_for_more_frames_or_pixels_than_the_server():
    data = make_video_bytes(56, 56, 300, 10)  # 30 s
    server = SMALL.updated({"max_frames": 16, "fps": 1.0, "video_total_pixels": 16 * 784})
    for key, value in [("max_frames", 768), ("min_frames", 768), ("fps", 30), ("video_total_pixels", 10**9),
                       ("video_max_pixels", 10**9), ("video_min_pixels", 10**9)]:
        with pytest.raises(MediaError, match=f"mm_processor_kwargs {key} .* is over the server's"):
            server.tightened({key: value})
    assert probe_video(data, server.tightened({"max_frames": 16, "fps": 1.0}))[0] <= 8


# --- PyAV compatibility ---------------------------------------------------------------------------------------


def test_pyav_without_metadata_errors_keyword(monkeypatch):
    # PyAV 19 removed av.open's metadata_errors: the first refusal drops the keyword, for good
    data = make_video_bytes(56, 56, 30, 10)  # before av.open is replaced: writing uses it too
    real_open = av.open
    calls = []

    def pyav19_open(*args, **kwargs):
        calls.append(sorted(kwargs))
        if "metadata_errors" in kwargs:
            raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", pyav19_open)
    monkeypatch.setattr(video, "_AV_OPEN_KWARGS", dict(video._AV_OPEN_KWARGS))  # restored after the test
    assert process_video(data, SMALL).grid_thw == probe_video(data, SMALL) == (3, 4, 4)
    assert calls[:2] == [["metadata_errors"], []] and calls[2:] == [[]] * (len(calls) - 2)


def test_pyav_with_metadata_errors_keeps_using_it(monkeypatch):
    data = make_video_bytes(56, 56, 30, 10)
    real_open = av.open
    calls = []
    monkeypatch.setattr(av, "open", lambda *a, **k: calls.append(sorted(k)) or real_open(*a, **k))
    process_video(data, SMALL)
    assert calls and all(kwargs == ["metadata_errors"] for kwargs in calls)


def test_other_type_errors_from_av_open_are_not_swallowed(monkeypatch):
    def broken_open(*args, **kwargs):
        raise TypeError("something else")

    monkeypatch.setattr(av, "open", broken_open)
    monkeypatch.setattr(video, "_AV_OPEN_KWARGS", dict(video._AV_OPEN_KWARGS))
    with pytest.raises(TypeError, match="something else"):
        process_video(b"x", SMALL)
    assert video._AV_OPEN_KWARGS == {"metadata_errors": "replace"}
