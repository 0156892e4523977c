"""Chat messages -> prompt: validate the messages, render them with the checkpoint's chat template, and the pad
rule (one placeholder per media item, expanded to one pad per merged vision token). Media loading is the input
processor's (vlserve/inputs/), which calls these in order: parse_messages, render_chat, check_placeholders, then
expand_media_tokens once the media is preprocessed.

Accepted parts: OpenAI `text`, `image_url`, `video_url` (url in `{"url": ...}` or a bare string) and the
Qwen/transformers `image` (url or PIL image) and `video` (url). A media part may carry `min_pixels` /
`max_pixels` (qwen-vl-utils style) to override the request's preprocessing for that item.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import transformers
from transformers.utils.chat_template_utils import _compile_jinja_template
from PIL import Image

from vlserve.config import ModelConfig
from vlserve.errors import ConfigError, InvalidRequestError
from vlserve.engine.sequence import MediaSpan
from vlserve.media.item import MediaItem
from vlserve.media.templates import TOOLS_TEMPLATE

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer system, rendered as one
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                                      "add_generation_prompt", "continue_final_message", "return_dict", "padding",
                                      "truncation", "max_length", "return_tensors", "tokenizer_kwargs"})
MEDIA_PARTS = {"image_url": "image", "image": "image", "video_url": "video", "video": "video"}  # type -> modality
PART_EXAMPLES = {
    "text": '{"type": "text", "text": "..."}',
    "image_url": '{"type": "image_url", "image_url": {"url": "https://... or data:image/png;base64,..."}}',
    "image": '{"type": "image", "image": "https://..."}',
    "video_url": '{"type": "video_url", "video_url": {"url": "https://..."}}',
    "video": '{"type": "video", "video": "https://..."}',
}
PART_OPTIONS = ("min_pixels", "max_pixels")  # per item; videos map them to video_min_pixels / video_max_pixels


@dataclass(frozen=True)
class Rendering:
    """How a chat becomes a prompt: a generation prompt after it (the assistant's turn opened), or the final
    message left open for the model to continue (vLLM's continue_final_message), and the template's variables."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict | None = None
    tools: list[dict] | None = None  # OpenAI's tool definitions, listed by the template for the model

    def __post_init__(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidRequestError("continue_final_message continues the last message, add_generation_prompt "
                                      "opens a new one: set add_generation_prompt to false to continue")
        taken = sorted(set(self.template_kwargs or {}) & RESERVED_TEMPLATE_KWARGS)
        if taken:
            raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(taken)}: those are the "
                                      "request's own fields (messages, add_generation_prompt, ...)")


@dataclass(frozen=True)
class MediaRef:
    """One media part found in the messages, before fetching."""
    modality: Literal["image", "video"]
    source: str | bytes | Image.Image
    where: str  # e.g. "messages[1].content[0]", prefixed to errors about this item
    overrides: dict[str, int] = field(default_factory=dict)  # MediaOptions field -> value


def load_tokenizer(model_dir: str | Path, chat_template: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of the folder `model_dir` (a checkpoint's, or --tokenizer's), with `chat_template` (a file,
    or the template's text: --chat-template) in place of its own."""
    if not Path(model_dir).is_dir():
        raise ConfigError(f"model folder {model_dir} does not exist; pass a folder holding a Hugging Face checkpoint")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the tokenizer from {model_dir}: {e}; the folder needs tokenizer.json "
                          f"(or vocab.json + merges.txt) and tokenizer_config.json") from e
    # Some VL checkpoints keep the template only in the processor's chat_template.json.
    processor_template = Path(model_dir) / "chat_template.json"
    if not tokenizer.chat_template and processor_template.is_file():
        tokenizer.chat_template = json.loads(processor_template.read_text())["chat_template"]
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def read_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the template itself (as vLLM takes it); refused if it does not parse."""
    looks_like_path = "{" not in value and "\n" not in value
    if looks_like_path:
        if not Path(value).is_file():
            raise ConfigError(f"--chat-template {value!r} is not a file (nor a Jinja template: it has no '{{'); "
                              f"pass a .jinja file, e.g. {TOOLS_TEMPLATE}")
        value = Path(value).read_text()
    try:
        _compile_jinja_template(value)  # as transformers will render it (its extensions and filters)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template does not parse as Jinja (line {e.lineno}: {e.message})") from e
    return value


def render_chat(tokenizer: transformers.PreTrainedTokenizerBase, cfg: ModelConfig, chat: list[dict],
                rendering: Rendering = Rendering()) -> list[int]:
    """Token ids of `chat` (from parse_messages) rendered with the checkpoint's chat template: one placeholder pad
    per media item, not expanded yet."""
    if not tokenizer.chat_template:
        raise InvalidRequestError(f"the checkpoint {Path(cfg.path).name!r} has no chat template, so it cannot serve "
                                  "chat requests; send a plain prompt to the completions endpoint instead")
    if rendering.tools and "tools" not in tokenizer.chat_template:
        raise InvalidRequestError(
            f"the chat template of {Path(cfg.path).name!r} does not show tools to the model (Qwen2.5-VL's own does "
            f"not); start the server with --chat-template {TOOLS_TEMPLATE} (its template plus Qwen's tool format)")
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False,
                                             add_generation_prompt=rendering.add_generation_prompt,
                                             continue_final_message=rendering.continue_final_message,
                                             tools=rendering.tools, **(rendering.template_kwargs or {}))
    except (jinja2.TemplateError, ValueError) as e:  # ValueError: no final message text to continue
        raise InvalidRequestError(f"the model's chat template refused these messages: {e}") from e
    # The template already wrote every special token; adding more (a BOS) would differ from training.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_placeholders(token_ids: list[int], modalities: list[str], cfg: ModelConfig) -> None:
    """The pad rule: the prompt holds exactly one <|image_pad|>/<|video_pad|> per media item, in the items' order
    (raw token-id prompts too, and none smuggled in through text)."""
    if modalities:
        _require_vision(cfg, "the request")
    pad_modality = {cfg.image_token_id: "image", cfg.video_token_id: "video"} if cfg.is_multimodal else {}
    found = [pad_modality[t] for t in token_ids if t in pad_modality]
    if found != list(modalities):
        given = list(modalities)
        raise InvalidRequestError(
            f"the prompt holds {found.count('image')} image and {found.count('video')} video placeholders "
            f"(<|image_pad|> id {cfg.image_token_id}, <|video_pad|> id {cfg.video_token_id}) in the order "
            f"{found[:8]}, but the request has {given.count('image')} images and {given.count('video')} videos in "
            f"the order {given[:8]}; put exactly one placeholder per item, in order, and none inside text")


def expand_media_tokens(token_ids: list[int], media: list[MediaItem], cfg: ModelConfig,
                        tokenizer: transformers.PreTrainedTokenizerBase | None = None
                        ) -> tuple[list[int], list[MediaSpan]]:
    """Repeat each placeholder pad item.num_tokens times (as Qwen2_5_VLProcessor does); returns the ids and where
    each item's runs of pads sit. The placeholders must have passed check_placeholders.

    Qwen3-VL's videos (`VisionConfig.timestamps`) become, as its processor writes them, one run per temporal patch:
    `<1.5 seconds><|vision_start|>` pads `<|vision_end|>` for each, in place of the placeholder's own
    `<|vision_start|>` ... `<|vision_end|>`; the first timestamp tokenized with the text before it, as the processor
    does (`_append_text`), the others alone (`tokenizer` needed)."""
    pads = {cfg.image_token_id, cfg.video_token_id} if cfg.is_multimodal else set()
    items, expanded, spans, skip = iter(media), [], [], None
    for t in token_ids:
        if t == skip:  # the placeholder's <|vision_end|>, written per frame instead
            skip = None
            continue
        skip = None
        if t not in pads:
            expanded.append(t)
            continue
        item = next(items)
        if item.modality == "video" and cfg.vision.timestamps:
            if expanded and expanded[-1] == cfg.vision_start_token_id:
                expanded.pop()
            spans += _timestamped_frames(item, expanded, cfg, tokenizer)
            skip = cfg.vision_end_token_id
            continue
        spans.append(MediaSpan(item, len(expanded), len(expanded) + item.num_tokens))
        expanded.extend([t] * item.num_tokens)
    return expanded, spans


TIMESTAMP = "<{:.1f} seconds>"  # Qwen3-VL's text before each temporal patch of a video
# "<", "0", ".", "5", " seconds", ">" (each digit a token), less one: the first "<" may join the text before it
TIMESTAMP_MIN_TOKENS = 5


def _timestamped_frames(item: MediaItem, expanded: list[int], cfg: ModelConfig,
                        tokenizer: transformers.PreTrainedTokenizerBase) -> list[MediaSpan]:
    """Appends each temporal patch's timestamp, <|vision_start|>, pads and <|vision_end|> to `expanded`."""
    per_frame, spans = item.num_tokens // item.grid_thw[0], []
    for frame, seconds in enumerate(item.frame_seconds):
        if frame == 0:
            _append_text(expanded, TIMESTAMP.format(seconds), tokenizer)
        else:  # after <|vision_end|>, a special token: tokenized alone
            expanded += tokenizer(TIMESTAMP.format(seconds), add_special_tokens=False)["input_ids"]
        expanded.append(cfg.vision_start_token_id)
        spans.append(MediaSpan(item, len(expanded), len(expanded) + per_frame, offset=frame * per_frame))
        expanded += [cfg.video_token_id] * per_frame
        expanded.append(cfg.vision_end_token_id)
    return spans


def _append_text(ids: list[int], text: str, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """`text` appended as transformers' processor writes it into the prompt's text: tokenized together with the
    text since the last special token (":" then "<" is one token, ":<"), when those tokens are that text's own
    tokens (a chat's always are; a token-id prompt's may not be, and then keeps its tokens)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    start = next((i + 1 for i in range(len(ids) - 1, -1, -1) if ids[i] in special), 0)
    before = tokenizer.decode(ids[start:], clean_up_tokenization_spaces=False)
    if tokenizer(before, add_special_tokens=False)["input_ids"] == ids[start:]:
        ids[start:] = tokenizer(before + text, add_special_tokens=False)["input_ids"]
    else:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]


def text_tokens_around(modality: str, grid_thw: tuple[int, int, int], cfg: ModelConfig) -> int:
    """At least how many text tokens expand_media_tokens adds around an item's pads: Qwen3-VL's video timestamps
    and per-frame <|vision_start|> / <|vision_end|> (less the placeholder's pair), else none."""
    if modality != "video" or not cfg.vision.timestamps:
        return 0
    return grid_thw[0] * (TIMESTAMP_MIN_TOKENS + 2) - 2


def parse_messages(messages: Any, cfg: ModelConfig) -> tuple[list[dict], list[MediaRef]]:
    """Validate OpenAI/Qwen-style messages into what the Qwen template expects, plus the media parts in order."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(f"'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, "
                                  f"got {_describe(messages)}")
    refs: list[MediaRef] = []
    chat = [_parse_message(i, message, refs) for i, message in enumerate(messages)]
    if refs:
        _require_vision(cfg, refs[0].where)
    return chat, refs


def _parse_message(i: int, message: Any, refs: list[MediaRef]) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(f"{where} must be an object with 'role' and 'content', got {_describe(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"{where}.role is {role!r}; use one of {', '.join(ROLES)}")
    role = "system" if role == "developer" else role
    content = message.get("content")
    extra = _tool_fields(where, role, message)
    if content is None and "tool_calls" in extra:
        return {"role": role, "content": "", **extra}
    if isinstance(content, str):
        return {"role": role, "content": content, **extra}
    if not isinstance(content, list) or not content:
        raise InvalidRequestError(f"{where}.content must be a string or a non-empty list of parts such as "
                                  f"{PART_EXAMPLES['text']}, got {_describe(content)}")
    parts = [_parse_part(f"{where}.content[{j}]", role, part, refs) for j, part in enumerate(content)]
    return {"role": role, "content": parts, **extra}


def _tool_fields(where: str, role: str, message: dict) -> dict:
    """An assistant's tool_calls (arguments parsed: templates write them as JSON objects) and a tool message's
    tool_call_id, as chat templates read them."""
    if role == "tool":
        return {"tool_call_id": message["tool_call_id"]} if isinstance(message.get("tool_call_id"), str) else {}
    calls = message.get("tool_calls")
    if role != "assistant" or not calls:
        return {}
    parsed = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"{where}.tool_calls[{j}] needs a function with a name, e.g. "
                                      '{"type": "function", "function": {"name": "f", "arguments": "{}"}}')
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (json.JSONDecodeError, TypeError) as e:
            raise InvalidRequestError(f"{where}.tool_calls[{j}].function.arguments is not JSON text ({e}); send "
                                      "the arguments as a JSON string, as the model returned them") from e
        parsed.append({"type": "function", "id": call.get("id"),
                       "function": {"name": function["name"], "arguments": arguments}})
    return {"tool_calls": parsed}


def _parse_part(where: str, role: str, part: Any, refs: list[MediaRef]) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where} is a text part without a string 'text'; send {PART_EXAMPLES['text']}")
        return {"type": "text", "text": part["text"]}
    if kind not in MEDIA_PARTS:
        got = f"type {kind!r}" if isinstance(part, dict) else _describe(part)
        raise InvalidRequestError(f"{where} has {got}; each part is an object whose 'type' is one of "
                                  f"{', '.join(PART_EXAMPLES)}, e.g. {PART_EXAMPLES['text']}")
    modality = MEDIA_PARTS[kind]
    # OpenAI allows media only in user turns, and Qwen2.5-VL was trained with media there.
    if role != "user":
        raise InvalidRequestError(f"{where} is {'an image' if modality == 'image' else 'a video'} in a message "
                                  f"with role {role!r}; images and videos go in user messages only")
    refs.append(MediaRef(modality, _source(where, kind, part), where, _overrides(where, modality, part)))
    return {"type": modality}


def _source(where: str, kind: str, part: dict) -> str | Image.Image:
    value = part.get(kind)
    if kind.endswith("_url"):
        if not isinstance(value, dict):  # OpenAI's schema: {"url": ...}; a bare string is a client's mistake
            raise InvalidRequestError(f"{where}.{kind} must be an object holding the URL, got {_describe(value)}; "
                                      f"send {PART_EXAMPLES[kind]}")
        value = value.get("url")
    if kind == "image" and isinstance(value, Image.Image):
        return value
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{where} has type {kind!r} but no URL (got {_describe(value)}); "
                                  f"send {PART_EXAMPLES[kind]}")
    return value


def _overrides(where: str, modality: str, part: dict) -> dict[str, int]:
    overrides = {}
    for key in PART_OPTIONS:
        if key not in part:
            continue
        value = part[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequestError(f"{where}.{key} must be a positive integer (pixels), got {value!r}")
        overrides[key if modality == "image" else f"video_{key}"] = value
    return overrides


def _require_vision(cfg: ModelConfig, where: str) -> None:
    if not cfg.is_multimodal:
        raise InvalidRequestError(f"{where} has an image or video, but the model {Path(cfg.path).name!r} is text-only "
                                  f"({cfg.architecture}); send text only, or serve a Qwen2.5-VL checkpoint")


def _describe(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {str(value)[:60]!r}"
