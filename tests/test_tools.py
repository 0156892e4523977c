"""Tool calling's parts without a server: the Hermes parser (whole and streamed), tool_choice rules, the template
that shows tools to the model."""

import json

import pytest

from vlserve.errors import InvalidRequestError
from vlserve.media.template import Rendering, load_tokenizer, parse_messages, render_chat
from vlserve.media.templates import TOOLS_TEMPLATE
from vlserve.config import ModelConfig
from vlserve.serve.protocol import ChatCompletionRequest
from vlserve.serve.tools import ChoiceTools, HermesParser, ToolMode, parse_text, tool_mode

CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1, "s": "</tool"}}\n</tool_call>'
TEXTS = [
    "plain answer, no call <tool",
    "Sure.\n" + CALL + "\n" + CALL.replace('"f"', '"g"'),
    CALL + "\ntrailing words",
    "<tool_call>\nnot json\n</tool_call> after",
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}',  # cut by max_tokens before the closing tag
    "<tool_call>\n{\"name\": \"f\", \"argu",  # cut inside the JSON
]


def streamed(text: str, size: int):
    parser, content, calls = HermesParser(), "", []
    for i in range(0, len(text), size):
        c, k = parser.feed(text[i:i + size])
        content, calls = content + c, calls + k
    c, k = parser.finish()
    return content + c, [(x.name, x.arguments) for x in calls + k]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_finds_what_the_whole_text_holds(text):
    content, calls = parse_text(text)
    whole = ((content or "").strip(), [(c.name, c.arguments) for c in calls])
    for size in (1, 2, 3, 7, 1000):
        got_content, got_calls = streamed(text, size)
        assert (got_content.strip(), got_calls) == whole, size


def test_what_the_parser_makes_of_each_text():
    assert parse_text(TEXTS[0]) == (TEXTS[0], [])
    content, calls = parse_text(TEXTS[1])
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"x": 1, "s": "</tool"}), ("g", {"x": 1, "s": "</tool"})]
    assert len({c.id for c in calls}) == 2
    assert parse_text(TEXTS[2])[0] == "trailing words"
    assert parse_text(TEXTS[3]) == ("<tool_call>\nnot json\n</tool_call> after", [])  # left as the model wrote it
    assert [c.name for c in parse_text(TEXTS[4])[1]] == ["f"]
    assert parse_text(TEXTS[5]) == (TEXTS[5], [])


def test_a_tag_prefix_is_held_back_until_it_is_known():
    parser = HermesParser()
    assert parser.feed("Hi <tool")[0] == "Hi "
    assert parser.feed("box> done")[0] == "<toolbox> done"


def test_required_output_cut_short_stays_text():
    tools = ChoiceTools(ToolMode("required"))
    assert tools.feed('[{"name": "f", "argu', finished=False) == ("", [])
    assert tools.feed("", finished=True) == ('[{"name": "f", "argu', [])
    assert tools.finish_reason("length") == "length"


def request(**fields):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_rules():
    tools = request(tools=[{"type": "function", "function": {"name": "f"}}]).tools
    assert tool_mode(None, None, auto_enabled=False) == ToolMode("none")
    assert tool_mode(tools, "none", auto_enabled=False) == ToolMode("none")
    assert tool_mode(tools, None, auto_enabled=True) == ToolMode("auto")
    with pytest.raises(InvalidRequestError, match="--enable-auto-tool-choice --tool-call-parser hermes"):
        tool_mode(tools, None, auto_enabled=False)  # auto is the default with tools, as OpenAI's
    named = request(tools=[{"type": "function", "function": {"name": "f"}}],
                    tool_choice={"type": "function", "function": {"name": "f"}}).tool_choice
    assert tool_mode(tools, named, auto_enabled=False) == ToolMode("named", "f")


def test_a_template_without_tools_is_refused_with_the_flag_to_use(tiny_ckpt):
    cfg = ModelConfig.from_dir(tiny_ckpt)
    chat, _ = parse_messages([{"role": "user", "content": "hi"}], cfg)
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(InvalidRequestError, match=f"--chat-template {TOOLS_TEMPLATE}"):
        render_chat(load_tokenizer(tiny_ckpt), cfg, chat, Rendering(tools=tools))
    ours = load_tokenizer(tiny_ckpt, str(TOOLS_TEMPLATE))
    assert render_chat(ours, cfg, chat) == render_chat(load_tokenizer(tiny_ckpt), cfg, chat)  # no tools: the same
    assert len(render_chat(ours, cfg, chat, Rendering(tools=tools))) > len(render_chat(ours, cfg, chat))
