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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 5e-324, 0.5])
@pytest.mark.parametrize("key", ["max_pixels", "fps", "max_frames"])
def test_non_finite_or_truncated_to_zero_values_refused(key, value):
    if key == "fps" and value in (5e-324, 0.5):
        assert MediaOptions().updated({key: value}).fps == value  # a float field keeps small positive values
        return
    for apply in (MediaOptions().updated, MediaOptions().tightened):
        with pytest.raises(MediaError, match=rf"mm_processor_kwargs\['{key}'\] must be a positive number"):
            apply({key: value})


def test_huge_numbers():
    with pytest.raises(MediaError, match=r"mm_processor_kwargs\['fps'\] must be a positive number"):
        MediaOptions().updated({"fps": 10**400})  # no float holds it
    assert MediaOptions().updated({"max_pixels": 10**400}).max_pixels == 10**400  # the server may
    with pytest.raises(MediaError, match="over the server's limit"):
        MediaOptions().tightened({"max_pixels": 10**400})  # a request may not


def test_min_over_max_says_what_to_change():
    with pytest.raises(MediaError, match="set min_pixels to at most 1000, or max_pixels to at least 3136"):
        MediaOptions().tightened({"max_pixels": 1000})  # under the server's min_pixels: the request lowers both


# ---- per-request options only tighten (a 1x1 PNG must not be upscaled to 3e8 pixels)

SERVER = MediaOptions()
# key -> the server option bounding it
CEILINGS = {
    "max_pixels": "max_pixels",
    "min_pixels": "max_pixels",
    "video_max_pixels": "video_max_pixels",
    "video_min_pixels": "video_max_pixels",
    "video_total_pixels": "video_total_pixels",
    "max_frames": "max_frames",
    "min_frames": "max_frames",
    "fps": "fps",
}


@pytest.mark.parametrize("key, ceiling", sorted(CEILINGS.items()))
def test_request_cannot_raise_a_server_ceiling(key, ceiling):
    limit = getattr(SERVER, ceiling)
    over = limit * 2 + 1
    with pytest.raises(MediaError) as err:
        SERVER.tightened({key: over})
    message = str(err.value)
    shown = f"{over:g}" if isinstance(over, float) else str(over)
    limit_shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
    which = "limit" if key == ceiling else ceiling
    assert message.startswith(f"mm_processor_kwargs {key} {shown} is over the server's {which} of {limit_shown}; "
                              f"ask for at most that, or start the server with a larger "
                              f"--mm-processor-kwargs '{{\"{ceiling}\": ...}}'")
    # the server's own flag may set it (with its partner raised too where needed)
    partner = {ceiling: over} if key != ceiling else {}
    assert getattr(SERVER.updated({key: over, **partner}), key) == over


@pytest.mark.parametrize("key, ceiling", sorted(CEILINGS.items()))
def test_request_may_ask_up_to_the_ceiling_and_lower(key, ceiling):
    limit = getattr(SERVER, ceiling)
    assert getattr(SERVER.tightened({key: limit}), key) == limit
    lower = limit / 2 if isinstance(limit, float) else limit // 2
    assert getattr(SERVER.tightened({key: lower}), key) == lower


def test_the_reported_attack_is_refused():
    with pytest.raises(MediaError, match="max_pixels 300000000 is over the server's limit of 12845056"):
        SERVER.tightened({"max_pixels": 3e8, "min_pixels": 3e8})
    with pytest.raises(MediaError, match="min_pixels 300000000 is over the server's max_pixels of 12845056"):
        SERVER.tightened({"min_pixels": 3e8})


def test_ceilings_are_the_server_options_not_the_request_ones():
    # raising max_pixels and min_pixels together must not let min_pixels pass against the raised max
    with pytest.raises(MediaError, match="over the server's"):
        SERVER.tightened({"max_frames": 10_000, "min_frames": 10_000})
    server = SERVER.updated({"max_pixels": 1000 * 784, "min_pixels": 784, "fps": 4, "max_frames": 64})
    assert server.tightened({"min_pixels": 1000 * 784}).min_pixels == 1000 * 784
    with pytest.raises(MediaError, match=r"--mm-processor-kwargs '\{\"fps\": ...\}'"):
        server.tightened({"fps": 5})
    with pytest.raises(MediaError, match="min_frames 65 is over the server's max_frames of 64"):
        server.tightened({"min_frames": 65})


def test_tightened_keeps_the_updated_key_checks():
    assert SERVER.tightened(None) is SERVER and SERVER.tightened({}) is SERVER
    opts = SERVER.tightened({"max_pixels": 100352.0, "fps": 1, "max_frames": 32.0})
    assert (opts.max_pixels, opts.fps, opts.max_frames) == (100352, 1.0, 32)
    assert isinstance(opts.max_pixels, int) and isinstance(opts.fps, float)
    for overrides, message in [({"max_source_pixels": 1}, "server limit"), ({"nope": 1}, "unknown"),
                               ({"fps": "2"}, "positive number"), ({"max_pixels": True}, "positive number")]:
        with pytest.raises(MediaError, match=message):
            SERVER.tightened(overrides)


def test_every_request_key_has_a_ceiling():
    from dataclasses import fields

    from vlserve.media.options import CEILINGS as MODULE_CEILINGS, CHECKPOINT_FIELDS, SERVER_LIMITS

    request_keys = {f.name for f in fields(MediaOptions)} - set(SERVER_LIMITS) - set(CHECKPOINT_FIELDS)
    assert set(MODULE_CEILINGS) == request_keys and MODULE_CEILINGS == CEILINGS


@pytest.mark.parametrize("key", ["patch_size", "temporal_patch_size", "merge_size"])
def test_patch_geometry_is_the_checkpoints(key):
    """Neither a flag nor a request may change how the vision tower cuts pixels: the checkpoint says."""
    for set_it in (MediaOptions().updated, SERVER.tightened):
        with pytest.raises(MediaError, match=f"{key}' is the vision tower's, read from the checkpoint"):
            set_it({key: 16})
