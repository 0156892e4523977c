import pytest

from vlserve.errors import MediaError
from vlserve.media.options import MediaOptions


def test_overrides_apply_with_types():
    opts = MediaOptions().updated({"max_pixels": 100352, "fps": 1, "max_frames": 32.0})
    assert (opts.max_pixels, opts.fps, opts.max_frames) == (100352, 1.0, 32)
    assert isinstance(opts.fps, float) and isinstance(opts.max_frames, int)
    assert MediaOptions().updated(None) == MediaOptions()


@pytest.mark.parametrize("overrides, message", [
    ({"max_pixel": 1000}, "unknown mm_processor_kwargs key 'max_pixel'; known keys: fps, max_frames"),
    ({"max_source_pixels": 10**12}, "server limit"),
    ({"max_aspect_ratio": 1000}, "server limit"),
    ({"fps": 0}, "must be a positive number"),
    ({"fps": "2"}, "must be a positive number"),
    ({"max_pixels": True}, "must be a positive number"),
    ({"min_pixels": 10**6, "max_pixels": 1000}, "min_pixels (1000000) is larger than max_pixels (1000)"),
    ({"min_frames": 10, "max_frames": 4}, "min_frames (10) is larger than max_frames (4)"),
    ({"video_min_pixels": 10**6, "video_max_pixels": 10}, "video_min_pixels"),
])
def test_bad_overrides_say_what_to_change(overrides, message):
    with pytest.raises(MediaError) as e:
        MediaOptions().updated(overrides)
    assert message in str(e.value)
