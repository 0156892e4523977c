"""Chat template + pad expansion against transformers' Qwen2_5_VLProcessor, M-RoPE positions against
transformers' get_rope_index, and request validation.

torchvision is not installed, so transformers' video processor cannot load. The reference processor gets the
real PIL image processor and a stand-in video processor that reports the grid and sampled fps of our decoded
video: the processor's own placeholder expansion and second_per_grid_ts logic still run.
"""

import base64
import io
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLProcessor, Qwen3VLConfig, Qwen3VLModel, Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from hf_reference import chat_prompt
from media_samples import make_video_bytes
from vlserve.config import EngineConfig, ModelConfig
from vlserve.inputs import InputProcessor
from vlserve.errors import ConfigError, InvalidRequestError, MediaError
from vlserve.media.item import MediaItem
from vlserve.media.positions import mrope_positions
from vlserve.media.video import frame_indices
from vlserve.media.template import (
    Rendering, check_placeholders, expand_media_tokens, load_tokenizer, parse_messages, render_chat,
)
from vlserve.model.tiny import TinySpec, make_tiny

IMAGE_PAD, VIDEO_PAD, VISION_START = 151655, 151656, 151652


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def cfg(tiny_ckpt):
    return ModelConfig.from_dir(tiny_ckpt)


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return InputProcessor.for_model(EngineConfig(model=str(tiny_ckpt)))


@pytest.fixture(scope="module")
def text_cfg(tmp_path_factory):
    return ModelConfig.from_dir(make_tiny(tmp_path_factory.mktemp("tiny_text"), TinySpec(text_only=True)))


class _StandInVideoProcessor:
    """Reports our decoded video's grid and sampled fps, or the `metadata` given (Qwen3-VL's: the sampled frames
    and the video's fps); transformers' own video processor needs torchvision."""
    merge_size = 2
    temporal_patch_size = 2

    def __init__(self, items: list[MediaItem], metadata: SimpleNamespace | None = None):
        self.items, self.metadata = items, metadata

    def __call__(self, videos, **kwargs):
        return {
            "pixel_values_videos": torch.cat([item.pixel_values for item in self.items]),
            "video_grid_thw": torch.tensor([item.grid_thw for item in self.items]),
            "video_metadata": [self.metadata or SimpleNamespace(sampled_fps=2 / item.second_per_grid_t)
                               for item in self.items],
        }


class _VideoStandInAllowed:
    def check_argument_for_proper_class(self, name, argument):
        # BaseVideoProcessor cannot be imported without torchvision, so the stand-in cannot be type-checked.
        if name != "video_processor":
            return super().check_argument_for_proper_class(name, argument)


class _Processor(_VideoStandInAllowed, Qwen2_5_VLProcessor):
    pass


class _Qwen3Processor(_VideoStandInAllowed, Qwen3VLProcessor):
    pass


def reference_processor(tiny_ckpt, tokenizer, videos: list[MediaItem]) -> Qwen2_5_VLProcessor:
    return _Processor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(tiny_ckpt), tokenizer=tokenizer,
                      video_processor=_StandInVideoProcessor(videos), chat_template=tokenizer.chat_template)


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    with torch.device("meta"):  # get_rope_index needs the config only, not weights
        return Qwen2_5_VLModel(Qwen2_5_VLConfig.from_pretrained(tiny_ckpt))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server decodes the very pixels the reference gets
    return data_url(buf.getvalue(), "image/png")


def fake_item(modality: str, grid_thw: tuple[int, int, int], second_per_grid_t: float = 1.0) -> MediaItem:
    t, h, w = grid_thw
    return MediaItem(modality, torch.zeros(t * h * w, 1176), grid_thw, f"{modality}{grid_thw}", second_per_grid_t,
                     merge_size=2)


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


# ---------------------------------------------------------------- (a) prompt tokens = Qwen2_5_VLProcessor

IMG_A, IMG_B, IMG_C = picture(100, 60, 1), picture(300, 200, 2), picture(64, 400, 3)


def chat_cases():
    """(name, our OpenAI/Qwen-style messages, reference Qwen-style messages with PIL images, images, video)"""
    video = make_video_bytes(112, 84, frames=8, fps=4)
    hello = [{"role": "user", "content": "Hello there!"}]
    yield "text only", hello, hello, [], None
    yield "default system with parts", [user(text("Hi "), text("again"))], [user(text("Hi "), text("again"))], [], None
    explicit = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    yield "explicit system", explicit, explicit, [], None
    turns = [{"role": "system", "content": [text("Be brief.")]},
             user(text("What is 2+2?")), {"role": "assistant", "content": "4"},
             user(text("And 3+3?")), {"role": "assistant", "content": [text("6")]}, user(text("Thanks"))]
    yield "multi-turn", turns, turns, [], None
    ours = [user({"type": "image_url", "image_url": {"url": png_url(IMG_A)}}, text("Compare"),
                 {"type": "image_url", "image_url": {"url": png_url(IMG_B)}}, {"type": "image", "image": IMG_C}),
            {"role": "assistant", "content": "They differ."},
            user({"type": "image", "image": png_url(IMG_B)}, text("And this one?"))]
    ref = [user({"type": "image", "image": IMG_A}, text("Compare"), {"type": "image", "image": IMG_B},
                {"type": "image", "image": IMG_C}),
           {"role": "assistant", "content": "They differ."},
           user({"type": "image", "image": IMG_B}, text("And this one?"))]
    yield "several images", ours, ref, [IMG_A, IMG_B, IMG_C, IMG_B], None
    ours = [user({"type": "image_url", "image_url": {"url": png_url(IMG_A)}},
                 {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}}, text("What moves?"))]
    ref = [user({"type": "image", "image": IMG_A}, {"type": "video", "video": "v.mp4"}, text("What moves?"))]
    yield "image and video", ours, ref, [IMG_A], video
    unicode = [{"role": "user", "content": "你好，世界！🌍🚀 Ça va? 👍🏽"}]
    yield "chinese and emoji", unicode, unicode, [], None


CHAT_CASES = list(chat_cases())


@pytest.mark.parametrize("name, ours, ref, images, video", CHAT_CASES, ids=[case[0] for case in CHAT_CASES])
def test_prompt_matches_transformers_processor(tiny_ckpt, tokenizer, cfg, hf_model, processor, name, ours, ref,
                                               images, video):
    prompt = chat_prompt(processor, ours)
    media = prompt.media
    videos = [m for m in media if m.modality == "video"]
    processor = reference_processor(tiny_ckpt, tokenizer, videos)
    ref_text = processor.apply_chat_template(ref, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[ref_text], images=images or None,
                         videos=[np.zeros((4, 84, 112, 3), np.uint8)] if video else None, return_tensors="pt")
    assert prompt.token_ids == expected["input_ids"][0].tolist()
    image_grids = [list(m.grid_thw) for m in media if m.modality == "image"]
    assert image_grids == (expected["image_grid_thw"].tolist() if images else [])
    if video:
        assert videos[0].grid_thw[0] == 2 and videos[0].second_per_grid_t == 1.0  # 2 s at 2 fps: 4 frames
    # The whole chain: the processor's own token types and grids into transformers' get_rope_index.
    positions, delta = mrope_positions(len(prompt.token_ids), prompt.spans, cfg)
    ref_positions, ref_delta = hf_model.get_rope_index(
        expected["input_ids"], expected["mm_token_type_ids"], expected.get("image_grid_thw"),
        expected.get("video_grid_thw"), expected.get("second_per_grid_ts"))
    assert torch.equal(positions, ref_positions[:, 0]) and delta == int(ref_delta)


def test_qwen3_vl_video_prompt_and_positions_match_transformers(qwen3_vl_ckpt):
    """Qwen3-VL writes each temporal patch of a video as "<t seconds>" and its own vision start, pads and end, the
    time the mean of the patch's two sampled frames; each such run has its own M-RoPE grid at temporal 0."""
    ours = InputProcessor.for_model(EngineConfig(model=str(qwen3_vl_ckpt)))
    video = make_video_bytes(112, 84, frames=8, fps=4)  # 4 frames sampled at 2 fps: indices 0, 2, 5, 7
    prompt = chat_prompt(ours, [user(text("Look:"), {"type": "video_url", "video_url": {"url": data_url(
        video, "video/mp4")}}, text("What moves?"))])
    (item,) = prompt.media
    stand_in = _StandInVideoProcessor([item], SimpleNamespace(fps=4.0, frames_indices=frame_indices(8, 4)))
    reference = _Qwen3Processor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(qwen3_vl_ckpt),
                                tokenizer=ours.tokenizer, video_processor=stand_in,
                                chat_template=ours.tokenizer.chat_template)
    ref_text = reference.apply_chat_template([user(text("Look:"), {"type": "video", "video": "v.mp4"},
                                                   text("What moves?"))], tokenize=False, add_generation_prompt=True)
    expected = reference(text=[ref_text], videos=[np.zeros((4, 84, 112, 3), np.uint8)], return_tensors="pt")
    assert prompt.token_ids == expected["input_ids"][0].tolist()
    assert ours.tokenizer.decode(prompt.token_ids).count(" seconds><|vision_start|><|video_pad|>") == 2
    cfg = ours.model_config
    positions, delta = mrope_positions(len(prompt.token_ids), prompt.spans, cfg)
    with torch.device("meta"):
        model = Qwen3VLModel(Qwen3VLConfig.from_pretrained(qwen3_vl_ckpt))
    ref_positions, ref_delta = model.get_rope_index(expected["input_ids"], expected["mm_token_type_ids"],
                                                    video_grid_thw=expected["video_grid_thw"])
    assert torch.equal(positions, ref_positions[:, 0]) and delta == int(ref_delta)


def test_generation_prompt_is_optional(processor, tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    without = chat_prompt(processor, messages, rendering=Rendering(add_generation_prompt=False)).token_ids
    with_ = chat_prompt(processor, messages).token_ids
    assert with_[: len(without)] == without
    assert tokenizer.decode(with_[len(without):]) == "<|im_start|>assistant\n"
    open_ = chat_prompt(processor, messages, rendering=Rendering(False, continue_final_message=True)).token_ids
    assert tokenizer.decode(open_).endswith("<|im_start|>assistant\nHello")  # the model goes on from "Hello"
    with pytest.raises(InvalidRequestError, match="set add_generation_prompt to false to continue"):
        Rendering(continue_final_message=True)


def test_part_pixel_limits_are_honoured(processor):
    url = png_url(picture(560, 560))
    messages = [user({"type": "image_url", "image_url": {"url": url}, "max_pixels": 112 * 112}, text("x"))]
    small = chat_prompt(processor, messages)
    [full] = chat_prompt(processor, [user({"type": "image", "image": url})]).media
    assert small.media[0].grid_thw == (1, 8, 8) and full.grid_thw == (1, 40, 40)
    assert small.token_ids.count(IMAGE_PAD) == 16


def test_expand_raw_token_prompt(cfg):
    items = [fake_item("image", (1, 4, 6)), fake_item("video", (2, 4, 4))]
    ids = [1, VISION_START, IMAGE_PAD, 2, VISION_START, VIDEO_PAD, 3]
    expanded, spans = expand_media_tokens(ids, items, cfg)
    assert expanded == [1, VISION_START] + [IMAGE_PAD] * 6 + [2, VISION_START] + [VIDEO_PAD] * 8 + [3]
    assert [(s.start, s.end) for s in spans] == [(2, 8), (10, 18)]


# ---------------------------------------------------------------- (b) positions = transformers get_rope_index


def hf_rope_index(model, token_ids: list[int], media: list[MediaItem]):
    ids = torch.tensor([token_ids])
    images = [m.grid_thw for m in media if m.modality == "image"]
    videos = [m for m in media if m.modality == "video"]
    position_ids, delta = model.get_rope_index(
        ids, mm_token_type_ids=(ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int(),
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor([m.grid_thw for m in videos]) if videos else None,
        second_per_grid_ts=torch.tensor([m.second_per_grid_t for m in videos]) if videos else None,
    )
    return position_ids[:, 0], int(delta)


def media_prompt(tokenizer, cfg, media: list[MediaItem]) -> tuple[list[int], list]:
    """The expanded token ids of a chat showing `media`, and the spans of its pads."""
    parts = [{"type": m.modality, m.modality: "unused"} for m in media]
    chat, _ = parse_messages([user(*parts, text("Describe what you see."))], cfg)
    return expand_media_tokens(render_chat(tokenizer, cfg, chat), media, cfg, tokenizer)


POSITION_CASES = {
    "text only": [],
    "one image": [fake_item("image", (1, 8, 12))],
    "two images, different aspect": [fake_item("image", (1, 4, 16)), fake_item("image", (1, 22, 6))],
    "multi-window image": [fake_item("image", (1, 24, 40))],  # 3 x 5 windows of 8 x 8 patches
    "short video": [fake_item("video", (2, 8, 8))],  # t positions 0, 2 stay below the 4 x 4 merged grid
    "image and video": [fake_item("image", (1, 6, 10)), fake_item("video", (2, 12, 8), 0.5)],
}


@pytest.mark.parametrize("name", list(POSITION_CASES))
def test_positions_match_transformers(hf_model, tokenizer, cfg, name):
    media = POSITION_CASES[name]
    token_ids, spans = media_prompt(tokenizer, cfg, media)
    positions, delta = mrope_positions(len(token_ids), spans, cfg)
    expected, expected_delta = hf_rope_index(hf_model, token_ids, media)
    assert positions.dtype == torch.int64 and positions.shape == (3, len(token_ids))
    assert torch.equal(positions, expected)
    assert delta == expected_delta == int(positions.max()) + 1 - len(token_ids)


def test_positions_layout_of_one_image(tokenizer, cfg):
    media = [fake_item("image", (1, 4, 6))]  # 2 x 3 merged tokens
    token_ids, spans = media_prompt(tokenizer, cfg, media)
    positions, delta = mrope_positions(len(token_ids), spans, cfg)
    start = token_ids.index(IMAGE_PAD)
    assert positions[:, start:start + 6].tolist() == [[start] * 6, [start] * 3 + [start + 1] * 3,
                                                      [start, start + 1, start + 2] * 2]
    assert positions[:, start + 6].tolist() == [start + 3] * 3  # <|vision_end|> at max + 1
    assert delta == 3 - 6


# ---------------------------------------------------------------- (c) long video: Qwen's max+1, not transformers 5.24


def test_long_video_text_restarts_after_the_largest_position(hf_model, tokenizer, cfg):
    media = [fake_item("video", (8, 4, 4))]  # t positions 0, 2, ..., 14 exceed the 2 x 2 merged grid
    token_ids, spans = media_prompt(tokenizer, cfg, media)
    positions, delta = mrope_positions(len(token_ids), spans, cfg)
    start = token_ids.index(VIDEO_PAD)
    end = start + media[0].num_tokens
    assert positions[0, start:end].unique().tolist() == [start + 2 * t for t in range(8)]
    assert positions[:, end].tolist() == [start + 15] * 3  # text resumes at max + 1
    assert delta == start + 15 + (len(token_ids) - end) - len(token_ids)
    expected, _ = hf_rope_index(hf_model, token_ids, media)
    assert torch.equal(positions[:, :end], expected[:, :end])  # the video itself agrees
    assert expected[:, end].tolist() == [start + 2] * 3  # transformers 5.24 advances by max(h, w) // 2 only


# ---------------------------------------------------------------- (d) bad input

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}

BAD_MESSAGES = {
    "not a list": ({"role": "user", "content": "hi"}, "'messages' must be a non-empty list"),
    "empty": ([], "'messages' must be a non-empty list"),
    "message not an object": (["hi"], "messages[0] must be an object"),
    "unknown role": ([{"role": "function", "content": "x"}], "messages[0].role is 'function'"),
    "missing role": ([{"content": "x"}], "messages[0].role is None"),
    "content missing": ([{"role": "user"}], "messages[0].content must be a string or a non-empty list"),
    "content a dict": ([{"role": "user", "content": {"text": "x"}}], "messages[0].content must be"),
    "content empty list": ([{"role": "user", "content": []}], "messages[0].content must be"),
    "part not an object": ([user("hi")], "messages[0].content[0] has str 'hi'"),
    "unknown part type": ([user({"type": "audio_url", "audio_url": "x"})],
                          "messages[0].content[0] has type 'audio_url'"),
    "part without type": ([user({"text": "x"})], "messages[0].content[0] has type None"),
    "text missing": ([user(text("ok"), {"type": "text"})], "messages[0].content[1] is a text part without"),
    "text not a string": ([user({"type": "text", "text": 3})], "messages[0].content[0] is a text part without"),
    "image_url without url": ([user({"type": "image_url", "image_url": {}})], "has type 'image_url' but no URL"),
    "image_url empty": ([user({"type": "image_url", "image_url": ""})], "image_url must be an object holding"),
    "image_url as a string": ([user({"type": "image_url", "image_url": "https://x/y.png"})],
                              "send {\"type\": \"image_url\", \"image_url\": {\"url\""),
    "image_url number": ([user({"type": "image_url", "image_url": {"url": 5}})], "but no URL"),
    "video_url missing": ([user({"type": "video_url"})], "messages[0].content[0].video_url must be an object"),
    "video not a string": ([user({"type": "video", "video": ["f1.png"]})], "has type 'video' but no URL"),
    "image in system": ([{"role": "system", "content": [IMG]}, user(text("x"))],
                        "messages[0].content[0] is an image in a message with role 'system'"),
    "video in assistant": ([user(text("x")), {"role": "assistant", "content": [{"type": "video", "video": "v"}]}],
                           "messages[1].content[0] is a video in a message with role 'assistant'"),
    "bad max_pixels": ([user({**IMG, "max_pixels": 0})], "messages[0].content[0].max_pixels must be a positive"),
    "bool min_pixels": ([user({**IMG, "min_pixels": True})], "min_pixels must be a positive integer"),
}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_bad_messages_are_refused(processor, cfg, name):
    messages, message = BAD_MESSAGES[name]
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        parse_messages(messages, cfg)
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        chat_prompt(processor, messages)


def test_text_only_model_refuses_media(tokenizer, text_cfg):
    messages = [user(text("What is this?"), IMG)]
    with pytest.raises(InvalidRequestError, match=r"messages\[0\].content\[1\] has an image or video, but the model"):
        parse_messages(messages, text_cfg)  # before fetching anything
    with pytest.raises(InvalidRequestError, match="is text-only"):
        check_placeholders([1, IMAGE_PAD], ["image"], text_cfg)
    check_placeholders([1, IMAGE_PAD], [], text_cfg)  # just a token for a text model
    assert expand_media_tokens([1, IMAGE_PAD], [], text_cfg)[0] == [1, IMAGE_PAD]
    chat, _ = parse_messages([{"role": "user", "content": "hi"}], text_cfg)
    assert render_chat(tokenizer, text_cfg, chat)


@pytest.mark.parametrize("token_ids, media, message", [
    ([1, IMAGE_PAD, 2], [], "holds 1 image and 0 video placeholders"),
    ([1, 2], [fake_item("image", (1, 4, 4))], "has 1 images and 0 videos"),
    ([IMAGE_PAD, IMAGE_PAD], [fake_item("image", (1, 4, 4))], "holds 2 image"),
    ([VIDEO_PAD, IMAGE_PAD], [fake_item("image", (1, 4, 4)), fake_item("video", (2, 4, 4))],
     r"order \['video', 'image'\].*order \['image', 'video'\]"),
])
def test_placeholder_mismatch(cfg, token_ids, media, message):
    with pytest.raises(InvalidRequestError, match=message):
        check_placeholders(token_ids, [m.modality for m in media], cfg)


def test_pad_token_typed_into_text_is_refused(processor):
    messages = [user(text("look: <|image_pad|>"))]
    with pytest.raises(InvalidRequestError, match="none inside text"):
        chat_prompt(processor, messages)


def test_media_errors_name_the_part(processor):
    messages = [user(text("x"), {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})]
    with pytest.raises(MediaError, match=r"^messages\[0\]\.content\[1\]: "):
        chat_prompt(processor, messages)


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "missing")):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ConfigError, match=f"could not load the tokenizer from {tmp_path}"):
        load_tokenizer(tmp_path)


def test_chat_template_from_processor_file_and_missing(tiny_ckpt, cfg, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    del tokenizer_config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    refusing = "{{ raise_exception('roles must alternate') }}"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": refusing}))
    messages = [{"role": "user", "content": "hi"}]
    chat, _ = parse_messages(messages, cfg)
    with pytest.raises(InvalidRequestError, match="chat template refused these messages: roles must alternate"):
        render_chat(load_tokenizer(folder), cfg, chat)
    (folder / "chat_template.json").unlink()
    with pytest.raises(InvalidRequestError, match="has no chat template"):
        render_chat(load_tokenizer(folder), cfg, chat)


def test_patch_geometry_comes_from_the_checkpoint(tiny_ckpt, tmp_path):
    """The same request through a checkpoint whose vision tower cuts 16-pixel patches (Qwen3-VL's): grids,
    token counts and pixel rows follow its config.json, nothing assumes 14."""
    folder = tmp_path / "patch16"
    shutil.copytree(tiny_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"].update(patch_size=16, window_size=128)
    (folder / "config.json").write_text(json.dumps(config))
    messages = [user({"type": "image", "image": picture(320, 320)}, text("x"))]
    for ckpt, patch in ((tiny_ckpt, 14), (folder, 16)):
        prompt = chat_prompt(InputProcessor.for_model(EngineConfig(model=str(ckpt))), messages)
        (item,) = prompt.media
        side = 320 // (2 * patch) * 2  # 320 rounded to a multiple of 2 * patch, in patches
        assert item.grid_thw == (1, side, side) and item.num_tokens == side * side // 4
        assert item.pixel_values.shape == (side * side, 3 * 2 * patch * patch)
        assert prompt.token_ids.count(IMAGE_PAD) == item.num_tokens
