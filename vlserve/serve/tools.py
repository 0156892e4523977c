"""Tool calling, as Qwen2.5 was trained for it (Hermes style): the chat template lists the tools, the model answers
with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, and this module turns them into OpenAI
`tool_calls`.

`tool_choice` decides how (OpenAI's semantics, vLLM's flags):
- "none": the tools are in the prompt, the answer is plain text;
- "auto" (the default when tools are sent): the model chooses; its text is parsed (`HermesParser`); needs
  `--enable-auto-tool-choice --tool-call-parser hermes`;
- "required" and a named function: a grammar (structured output) makes the model call: a JSON list of
  {"name", "arguments"} for "required", the named function's arguments for a named one; so even random weights
  produce valid calls.
"""

import json
import uuid
from dataclasses import dataclass, field

from vlserve.engine.sampling_params import StructuredOutputsParams
from vlserve.errors import InvalidRequestError
from vlserve.serve.protocol import DeltaFunctionCall, DeltaToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")


@dataclass
class ToolMode:
    """How one chat request's output becomes tool calls: "none", "auto", "required" or "named" (`name` set)."""

    choice: str = "none"
    name: str | None = None

    @property
    def calls_tools(self) -> bool:
        return self.choice != "none"


def tool_mode(tools: list | None, tool_choice, auto_enabled: bool) -> ToolMode:
    """The request's mode, refused where the server cannot serve it. `tool_choice` is the request's (None:
    "auto" with tools, as OpenAI's default)."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if not tools:
        if tool_choice != "none":
            raise InvalidRequestError("tool_choice needs tools: send the functions the model may call in 'tools'")
        return ToolMode()
    if isinstance(tool_choice, str):
        if tool_choice == "auto" and not auto_enabled:
            raise InvalidRequestError(
                'tool_choice "auto" (the default when tools are sent) needs the server started with '
                '--enable-auto-tool-choice --tool-call-parser hermes; or send tool_choice "required", "none", or a '
                'named function')
        return ToolMode(tool_choice)
    name = tool_choice.function.name
    if name not in [t.function.name for t in tools]:
        raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not among the tools sent "
                                  f"({', '.join(t.function.name for t in tools)})")
    return ToolMode("named", name)


def parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_grammar(tools: list, mode: ToolMode, parallel: bool) -> StructuredOutputsParams | None:
    """The structured output that forces a call ("required", named); None for "auto" and "none"."""
    if mode.choice == "named":
        tool = next(t for t in tools if t.function.name == mode.name)
        return StructuredOutputsParams(json=parameters(tool))
    if mode.choice != "required":
        return None
    call = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                        "arguments": parameters(t)},
                       "required": ["name", "arguments"]} for t in tools]}
    schema = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def template_tools(tools: list | None) -> list[dict] | None:
    """The tools as chat templates take them (OpenAI's form: {"type": "function", "function": {...}})."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def calls_of_list(text: str) -> list[ToolCall]:
    """"required" mode's output: the grammar made it a JSON list of {"name", "arguments"}."""
    return [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(text)]


class HermesParser:
    """Text -> content and tool calls, incrementally: `feed` takes each text delta and returns what is certain so
    far (content that cannot be the start of a `<tool_call>`, and calls whose block closed); `finish` returns the
    rest. A block that is not a JSON object with a name stays in the content, as the model wrote it."""

    def __init__(self):
        self.buffer, self.in_call, self.calls = "", False, 0
        self.space = ""  # whitespace after a call, held until words follow it (before a call or the end: dropped)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    return content, calls
                block, self.buffer, self.in_call = self.buffer[:end], self.buffer[end + len(CLOSE):], False
                call = parse_call(block)
                if call is None:
                    content += OPEN + block + CLOSE
                else:
                    calls.append(call)
                    self.calls += 1
            else:
                start = self.buffer.find(OPEN)
                if start < 0:
                    keep = partial_tag(self.buffer)
                    cut = len(self.buffer) - keep
                    content += self.visible(self.buffer[:cut])
                    self.buffer = self.buffer[cut:]
                    return content, calls
                content += self.visible(self.buffer[:start])
                self.buffer, self.in_call, self.space = self.buffer[start + len(OPEN):], True, ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: an unclosed block is a call if it parses (max_tokens may cut the closing tag),
        else content."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            call = parse_call(rest)
            if call is not None:
                self.calls += 1
                return "", [call]
            return OPEN + rest, []
        return self.visible(rest), []

    def visible(self, text: str) -> str:
        """Between and after calls the model writes newlines: not content, unless words follow."""
        if not self.calls:
            return text
        self.space += text
        if not self.space.strip():
            return ""
        text, self.space = self.space, ""
        return text


def partial_tag(text: str) -> int:
    """How many trailing characters of `text` could begin `<tool_call>`."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def parse_call(block: str) -> ToolCall | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ToolCall(call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                         ensure_ascii=False))


def parse_text(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output: (its content, None when it held only calls; its calls)."""
    parser = HermesParser()
    content, calls = parser.feed(text)
    rest, last = parser.finish()
    content, calls = content + rest, calls + last
    return (content.strip() or None, calls) if calls else (content, [])


class ChoiceTools:
    """One choice's output in `mode`, as it streams: each text delta becomes (content, tool-call deltas). "auto"
    parses Hermes blocks as they close; a named call streams its arguments as they come; "required" gives its calls
    once the grammar's JSON list is complete (at the end)."""

    def __init__(self, mode: ToolMode):
        self.mode, self.parser, self.text, self.num_calls = mode, HermesParser(), "", 0
        self.named_id = ToolCall(mode.name or "", "").id

    def feed(self, text: str, finished: bool) -> tuple[str, list[DeltaToolCall]]:
        if self.mode.choice == "auto":
            content, calls = self.parser.feed(text)
            if finished:
                rest, last = self.parser.finish()
                content, calls = content + rest, calls + last
            return content, self.deltas(calls)
        if self.mode.choice == "named":
            first = self.num_calls == 0
            self.num_calls = 1
            if first:  # the call's id and name open it, with whatever arguments came
                return "", [DeltaToolCall(index=0, id=self.named_id, type="function",
                                          function=DeltaFunctionCall(name=self.mode.name, arguments=text))]
            return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))] if text else []
        self.text += text  # required
        if not finished:
            return "", []
        try:
            return "", self.deltas(calls_of_list(self.text))
        except (json.JSONDecodeError, KeyError, TypeError):  # cut short by max_tokens: the text as it is
            return self.text, []

    def deltas(self, calls: list[ToolCall]) -> list[DeltaToolCall]:
        out = [DeltaToolCall(index=self.num_calls + i, id=c.id, type="function",
                             function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
               for i, c in enumerate(calls)]
        self.num_calls += len(calls)
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return tool_finish_reason(bool(self.num_calls) and self.mode.choice in ("auto", "required"), reason)


def tool_finish_reason(chose: bool, reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model called tools of its own choice (auto, required) and stopped."""
    return "tool_calls" if chose and reason == "stop" else reason


def whole_choice(text: str, mode: ToolMode) -> tuple[str | None, list[ToolCall], bool]:
    """A finished choice's (content, tool calls, whether the model chose to call) in `mode`."""
    if mode.choice == "auto":
        content, calls = parse_text(text)
        return content, calls, bool(calls)
    if mode.choice == "named":
        return None, [ToolCall(mode.name, text)], False
    if mode.choice == "required":
        try:
            return None, calls_of_list(text), True
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, [], False
    return text, [], False
