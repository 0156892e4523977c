"""OpenAI API schema (the parts vlserve serves), as pydantic models.

As vLLM's server does, a request may carry fields vlserve does not use (OpenAI's `store`, `metadata`, `user`, a
framework's own keys, extra keys inside messages): they are accepted and named in the log (`ignored_fields`).
Fields that would change the answer are never ignored: vlserve either serves them or refuses the request with 400
and what to change (`tools`, `response_format` json modes, `logit_bias`, guided decoding, for now).
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlserve.media.template import Rendering

INT64 = 2**63  # seeds are int64 in vLLM's and OpenAI's schema
NOT_YET = ("{field} is not supported by vlserve yet, and ignoring it would change the answer; drop it from the "
           "request")


class RequestPart(BaseModel):
    """A request body or a part of one: unknown fields kept (ignored_fields names them), NaN and Infinity refused."""
    # Python's JSON parser reads NaN and Infinity; no sampling or media parameter means anything with them
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def unicode_only(cls, value):
        """JSON escapes like "\\ud800" decode to lone surrogates, which are not text (no tokenizer takes them);
        the UnicodeEncodeError (a ValueError) becomes the field's validation error."""
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                text.encode()
        return value


# ---- requests ----
class ImageURL(RequestPart):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for client compatibility; no effect


class VideoURL(RequestPart):
    url: str


class TextPart(RequestPart):
    type: Literal["text"]
    text: str


class ImagePart(RequestPart):
    type: Literal["image_url"]
    image_url: ImageURL  # an object, as OpenAI's schema has it: a bare string is refused


class VideoPart(RequestPart):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(RequestPart):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(RequestPart):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # with include_usage: every chunk carries the usage so far (vLLM's)


class SamplingFields(RequestPart):
    """Fields shared by chat and completions requests (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:42" (vLLM's), for bytes no text holds
    user: str | None = None  # accepted for client compatibility; not used
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def no_logit_bias(cls, value):
        if value:
            raise ValueError(NOT_YET.format(field="logit_bias"))
        return value

    @model_validator(mode="after")
    def stream_options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @model_validator(mode="before")
    @classmethod
    def no_guided_decoding(cls, data):
        guided = [k for k in GUIDED_FIELDS if isinstance(data, dict) and data.get(k) is not None]
        if guided:
            raise ValueError(NOT_YET.format(field=", ".join(guided)) + " (structured output is planned)")
        return data


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


class ResponseFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema"]

    @field_validator("type")
    @classmethod
    def text_only(cls, value):
        if value != "text":
            raise ValueError(NOT_YET.format(field=f"response_format {value}") + " (structured output is planned)")
        return value


class ChatFields(RequestPart):
    """How chat and /tokenize requests render their messages."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # passed to the chat template (e.g. its own switches)

    def rendering(self) -> Rendering:
        return Rendering(self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs)


class ChatCompletionRequest(SamplingFields, ChatFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    mm_processor_kwargs: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def no_tools(cls, value):
        if value:
            raise ValueError(NOT_YET.format(field="tools") + " (tool calling is planned)")
        return value


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False  # the prompt's text before each choice's (with logprobs it would need prompt logprobs)

    @model_validator(mode="after")
    def echo_without_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError(NOT_YET.format(field="echo with logprobs (the prompt's logprobs)"))
        return self


class TokenizeRequest(ChatFields):
    """vLLM's /tokenize: a prompt (as completions takes it) or chat messages (as chat takes them, media
    included: each image or video counts as the tokens it becomes)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    mm_processor_kwargs: dict[str, float] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (a string) or messages (a chat), not both or neither")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestPart):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- responses ----
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None  # {"cached_tokens": n}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


def ignored_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields a request carried that no model declares (accepted, not used)."""
    found = [prefix + key for key in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                found += ignored_fields(item, f"{prefix}{name}[{i}]." if isinstance(value, list) else
                                        f"{prefix}{name}.")
    return found


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vlserve"
    root: str
    max_model_len: int
    random_weights: bool = False  # vlserve's: make-tiny's checkpoint or --load-format dummy; answers are noise


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_json(status: int, message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=status)).model_dump()
