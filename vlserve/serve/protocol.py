"""OpenAI API schema (the parts vlserve serves), as pydantic models.

As vLLM's server does, a request may carry fields vlserve does not use (OpenAI's `store`, `metadata`, `user`, a
framework's own keys, extra keys inside messages): they are accepted and named in the log (`ignored_fields`).
Fields that would change the answer are never ignored: vlserve either serves them or refuses the request with 400
and what to change.
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlserve.errors import InvalidRequestError

from vlserve.engine.sampling_params import StructuredOutputsParams
from vlserve.media.template import Rendering

INT64 = 2**63  # seeds are int64 in vLLM's and OpenAI's schema
MAX_TOOLS = 128  # as OpenAI's


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


class FunctionCall(RequestPart):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestPart):
    """A call the assistant made (in the history a client sends back)."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(RequestPart):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: str | list[ContentPart] | None = None  # None: an assistant turn that only called tools
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call this message answers

    @model_validator(mode="after")
    def content_unless_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls may "
                             "leave it out)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong in assistant messages, not {self.role}")
        return self


class FunctionDefinition(RequestPart):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # the arguments follow the schema (tool_choice required or named guarantee it)


class Tool(RequestPart):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestPart):
    name: str


class NamedToolChoice(RequestPart):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(RequestPart):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(RequestPart):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_with_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('type "json_schema" takes a json_schema object ({"name": ..., "schema": {...}}), and '
                             "only it does")
        return self

    def grammar(self) -> dict | None:
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            return {"json": self.json_schema.schema_}
        return None


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
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's form) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None
    # vLLM's structured output: its older guided_* fields and the newer structured_outputs object
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None  # OpenAI's (chat); vLLM takes it on completions too
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and this many most likely
    best_of: int | None = None  # refused above 1: vlserve does not rank samples
    use_beam_search: bool = False  # refused: no beam search
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last N tokens (-1: what fits)

    @field_validator("logit_bias")
    @classmethod
    def token_id_keys(cls, value):
        if value is not None and not all(k.isdigit() for k in value):
            raise ValueError("keys must be token ids (as strings, e.g. {\"50256\": -100})")
        return value

    @model_validator(mode="after")
    def stream_options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @model_validator(mode="after")
    def no_beam_search(self):
        if self.use_beam_search or (self.best_of or 1) > 1:
            raise ValueError("vlserve does not run beam search or rank best_of samples; drop use_beam_search and "
                             "best_of (n samples with temperature give several answers)")
        return self

    @model_validator(mode="after")
    def prompt_scores_in_whole_responses(self):
        if self.stream and self.scores_prompt:
            raise ValueError("prompt logprobs (prompt_logprobs, or echo with logprobs) come in whole responses only; "
                             "drop stream or them")
        return self

    @property
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None

    def structured(self) -> StructuredOutputsParams | None:
        """The one grammar of the request, from whichever field set it; two set is a conflict."""
        given = {name: value for name, value in (
            ("guided_json", self.guided_json and {"json": self.guided_json}),
            ("guided_regex", self.guided_regex and {"regex": self.guided_regex}),
            ("guided_choice", self.guided_choice and {"choice": self.guided_choice}),
            ("guided_grammar", self.guided_grammar and {"grammar": self.guided_grammar}),
            ("structured_outputs", self.structured_outputs),
            ("response_format", self.response_format and self.response_format.grammar())) if value}
        if len(given) > 1:
            raise InvalidRequestError(f"{' and '.join(given)} each set a structured output; send one")
        if not given:
            return None
        (name, fields), = given.items()
        try:
            return StructuredOutputsParams(**fields)
        except TypeError as e:  # an unknown key in structured_outputs
            raise InvalidRequestError(f"{name}: {e}; its keys are json, regex, choice, grammar, json_object") from e
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{name}: {e}") from e


class ChatFields(RequestPart):
    """How chat and /tokenize requests render their messages."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # passed to the chat template (e.g. its own switches)

    def rendering(self, tools: list[dict] | None = None) -> Rendering:
        return Rendering(self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs, tools)


class ChatCompletionRequest(SamplingFields, ChatFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    mm_processor_kwargs: dict[str, float] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False  # the prompt's text before each choice's (with logprobs: the prompt tokens' logprobs too)

    @property
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)


class TokenizeRequest(ChatFields):
    """vLLM's /tokenize: a prompt (as completions takes it) or chat messages (as chat takes them, media
    included: each image or video counts as the tokens it becomes)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)  # listed in the prompt, as a chat would
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


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCallOut] = []


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
    prompt_logprobs: "PromptLogprobs | None" = None  # vLLM's


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int  # which call of the choice: a call's deltas share it
    id: str | None = None  # in its first delta
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
    token_logprobs: list[float | None] = []  # None: the prompt's first token (echo), which has no logprob
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    def __add__(self, other: "CompletionLogprobs") -> "CompletionLogprobs":
        return CompletionLogprobs(tokens=self.tokens + other.tokens,
                                  token_logprobs=self.token_logprobs + other.token_logprobs,
                                  top_logprobs=self.top_logprobs + other.top_logprobs,
                                  text_offset=self.text_offset + other.text_offset)


class PromptLogprob(BaseModel):
    """vLLM's form of one token's entry in prompt_logprobs."""
    logprob: float
    rank: int | None = None  # 1 = the most likely; None for the prompt's token outside the top ones
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt position: token id -> entry; None first


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's


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


ChatCompletionResponse.model_rebuild()
