"""vLLM's API contract as clients meet it: fields vlserve does not use are accepted and logged, fields that would
change the answer are refused with what to change, and the small rules of the schema (seed range, media URLs as
objects, stream options, null keys in chunks, completions logprobs, VLLM_API_KEY) hold."""

import json
import os
import re
from unittest import mock

import httpx
import jsonschema
import openai
import pytest

from hf_reference import image_url, text
from live_server import live_server
from vlserve.media.templates import TOOLS_TEMPLATE

KEY = "sk-vllm-key"
HELLO = [{"role": "user", "content": "Hello"}]
WEATHER_ARGS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]},
                                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city", "days"], "additionalProperties": False}
FUNCTION = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                             "parameters": WEATHER_ARGS}}


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    """A server whose key comes from vLLM's variable alone, behind a (notional) proxy at /proxied."""
    env = {k: v for k, v in os.environ.items() if k != "VLSERVE_API_KEY"}
    with mock.patch.dict(os.environ, {**env, "VLLM_API_KEY": KEY}, clear=True):
        with live_server(tiny_ckpt, "--max-model-len", "512", "--served-model-name", "tiny",
                         "--root-path", "/proxied", "--chat-template", str(TOOLS_TEMPLATE), "--enable-auto-tool-choice",
                         "--tool-call-parser", "hermes") as (base, proc):
            yield base, proc


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(served, path: str, body: dict) -> httpx.Response:
    url = f"{served[0]}/{path.removeprefix('../')}" if path.startswith("../") else f"{served[0]}/v1/{path}"
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_vllm_api_key_guards_the_api(served):
    assert post(served, "chat/completions", {"messages": HELLO, "max_tokens": 1}).status_code == 200
    assert httpx.post(f"{served[0]}/v1/chat/completions", json={"messages": HELLO}, timeout=60).status_code == 401


def test_fields_vlserve_does_not_use_are_accepted_and_logged(served):
    body = {"model": "", "messages": [{"role": "developer", "content": "Be brief.", "cache_control": {"x": 1}},
                                      {"role": "user", "content": [{"type": "text", "text": "Hi", "extra": 1}]}],
            "max_tokens": 2, "store": False, "metadata": {"run": "7"}, "user": "u1", "reasoning_effort": "low",
            "parallel_tool_calls": False, "response_format": {"type": "text"}, "tools": [], "logit_bias": {},
            "chat_template_kwargs": {"enable_thinking": False}, "my_framework_key": [1, 2]}
    r = post(served, "chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny"  # model "" is the served model
    assert post(served, "chat/completions", {**body, "response_format": None}).status_code == 200
    log = served[1].output()
    for name in ("store", "metadata", "reasoning_effort", "my_framework_key",
                 "messages[0].cache_control", "messages[1].content[0].extra"):
        assert name in log.split("ignored fields it does not use:")[-1], name


@pytest.mark.parametrize("extra, says", [
    ({"response_format": {"type": "json_schema"}}, 'type "json_schema" takes a json_schema object'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "JSON schema of the structured output is not valid"),
    ({"guided_regex": "(a"}, "regex of the structured output is not valid"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_json and guided_regex each set"),
    ({"structured_outputs": {"jsonn": {}}}, "its keys are json, regex, choice, grammar, json_object"),
    ({"guided_choice": ["a"], "min_tokens": 1}, "min_tokens cannot be combined"),
    ({"logit_bias": {"x": 5.0}}, "keys must be token ids"),
    ({"logit_bias": {"42": 500}}, "biases in [-100, 100]"),
    ({"logit_bias": {"99999999": 1}}, "not in this model's vocabulary"),
    ({"allowed_token_ids": [10**9]}, "not in this model's vocabulary"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [FUNCTION], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not among the tools sent"),
    ({"tools": [FUNCTION], "tool_choice": "required", "guided_regex": "a"}, "already makes the output a call"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"messages": [{"role": "user", "content": None}]}, "a user message needs content"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "arguments is not JSON text"),
    ({"use_beam_search": True}, "does not run beam search"),
    ({"best_of": 3}, "does not run beam search"),
    ({"prompt_logprobs": 1, "stream": True}, "come in whole responses only"),
    ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20]"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be a positive count or -1"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed with stream: true"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}]},
     "image_url"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs may not set"),
])
def test_what_would_change_the_answer_is_refused_with_what_to_change(served, extra, says):
    r = post(served, "chat/completions", {"messages": HELLO, "max_tokens": 1, **extra})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_seeds_at_the_int64_bounds_are_taken(served):
    for seed in (2**63 - 1, -(2**63)):
        assert post(served, "chat/completions", {"messages": HELLO, "max_tokens": 1, "seed": seed}).status_code == 200


def test_developer_is_the_system_role(client):
    def greedy(role):
        messages = [{"role": role, "content": "Answer in French."}, *HELLO]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                              extra_body={"ignore_eos": True})
    system, developer = greedy("system"), greedy("developer")
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens


def raw_chunks(served, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{served[0]}/v1/{path}", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_stream_chunks_carry_null_keys_until_set(served):
    """Code reading the raw JSON (not a client library) looks up finish_reason and logprobs in every chunk."""
    chunks = raw_chunks(served, "chat/completions", {"messages": HELLO, "max_tokens": 3, "ignore_eos": True})
    choices = [c["choices"][0] for c in chunks]
    assert all("finish_reason" in c and "logprobs" in c for c in choices)
    assert [c["finish_reason"] for c in choices][:-1] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] == "length" and choices[0]["delta"]["role"] == "assistant"
    assert all("role" not in c["delta"] for c in choices[1:]) and all("usage" not in c for c in chunks)
    chunks = raw_chunks(served, "completions", {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert all("finish_reason" in c["choices"][0] and "logprobs" in c["choices"][0] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


@pytest.mark.parametrize("n", [0, 1, 3])
def test_completion_logprobs_hold_the_sampled_token(client, n):
    """logprobs: N gives the N most likely tokens plus the sampled one, as OpenAI's legacy API does."""
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, logprobs=n,
                                  temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(chosen)
        assert max(n, 1) <= len(top) <= n + 1 or n == 0 and len(top) == 1


def test_images_in_chat_still_work_with_extra_keys(client):
    part = {**image_url(56, 56, 3), "detail": "low"}
    messages = [{"role": "user", "content": [part, text("What is it?")]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={"store": True})
    assert r.choices[0].finish_reason in ("length", "stop")


def test_tokenize_counts_what_a_request_would_run(served, client):
    messages = [{"role": "user", "content": [image_url(112, 84, 1), text("What is this?")]}]
    r = post(served, "../tokenize", {"model": "tiny", "messages": messages, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) == chat.usage.prompt_tokens
    assert body["max_model_len"] == 512 and body["token_strs"][0] == "<|im_start|>"
    plain = post(served, "../tokenize", {"prompt": "Hello world"}).json()
    assert post(served, "../detokenize", {"tokens": plain["tokens"]}).json() == {"prompt": "Hello world"}
    assert plain["token_strs"] is None


@pytest.mark.parametrize("path, body, says", [
    ("../tokenize", {"prompt": "a", "messages": HELLO}, "either prompt"),
    ("../tokenize", {}, "either prompt"),
    ("../tokenize", {"prompt": "a", "model": "other"}, "not served here"),
    ("../detokenize", {"tokens": [1, -1, 10**9]}, "are not ids of this model's vocabulary"),
])
def test_tokenize_refusals(served, path, body, says):
    r = post(served, path, body)
    assert r.status_code in (400, 404) and says in r.json()["error"]["message"], r.text


def test_ping_root_path_and_the_key_on_tokenize(served):
    """--root-path as vLLM (and uvicorn) mean it: the prefix a reverse proxy strips before passing requests on."""
    base, _ = served
    for method in ("GET", "POST"):
        assert httpx.request(method, f"{base}/ping", timeout=30).json() == {"status": "ok"}
    assert httpx.post(f"{base}/tokenize", json={"prompt": "a"}, timeout=30).status_code == 401
    # the proxy strips --root-path (every other test here reaches the routes without it); the API's own links
    # carry it, and the key still guards what the prefix is stripped from
    assert httpx.get(f"{base}/openapi.json", timeout=30).json()["servers"] == [{"url": "/proxied"}]
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401


def test_continuous_usage_stats_count_as_they_go(served):
    body = {"messages": HELLO, "max_tokens": 4, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = raw_chunks(served, "chat/completions", body)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 4 and chunks[-1]["choices"] == []
    assert len({c["usage"]["prompt_tokens"] for c in chunks[1:]}) == 1
    chunks = raw_chunks(served, "completions", {**body, "prompt": "Hi", "messages": None})
    assert all("usage" in c for c in chunks) and chunks[-1]["usage"]["completion_tokens"] == 4
    body["stream_options"] = {"include_usage": False, "continuous_usage_stats": True}  # as vLLM: needs include_usage
    assert all("usage" not in c for c in raw_chunks(served, "chat/completions", body))


def test_tokens_as_ids_and_a_continued_final_message(client, served):
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    assert all(t.startswith("token_id:") for t in r.choices[0].logprobs.tokens)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=2,
                                       extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    assert all(t.token.startswith("token_id:") for t in r.choices[0].logprobs.content)
    ongoing = [*HELLO, {"role": "assistant", "content": "Bonjour, je"}]
    body = {"messages": ongoing, "return_token_strs": True}
    refused = post(served, "../tokenize", {**body, "continue_final_message": True})  # add_generation_prompt is on
    assert refused.status_code == 400 and "set add_generation_prompt to false" in refused.text
    opened = post(served, "../tokenize", {**body, "add_generation_prompt": False, "continue_final_message": True})
    assert "".join(opened.json()["token_strs"][-3:]).endswith("je")
    r = post(served, "chat/completions", {"messages": ongoing, "max_tokens": 2, "add_generation_prompt": False,
                                          "continue_final_message": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == opened.json()["count"]


VLLM_FAMILIES = ("time_to_first_token_seconds", "inter_token_latency_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds", "request_inference_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_params_n", "request_params_max_tokens",
                 "iteration_tokens_total", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens",
                 "generation_tokens", "request_success", "cache_config_info")


def has_family(text_: str, name: str) -> bool:
    """A TYPE line for `name` (counters' may read name_total, as prometheus_client writes vLLM's too)."""
    return any(line.split()[2] in (name, name + "_total") for line in text_.splitlines() if line.startswith("# TYPE"))


def samples(text_: str, name: str) -> dict[str, float]:
    """{label text: value} of one sample name in Prometheus' text format."""
    found = {}
    for line in text_.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name):].rpartition(" ")
            found[labels] = float(value)
    return found


def test_metrics_have_vllms_families_and_count_right(served, client):
    before = httpx.get(f"{served[0]}/metrics", timeout=30).text
    client.completions.create(model="tiny", prompt="Count me", max_tokens=5, n=3, extra_body={"ignore_eos": True})
    text_ = httpx.get(f"{served[0]}/metrics", timeout=30).text
    for family in VLLM_FAMILIES:
        assert has_family(text_, f"vlserve:{family}"), family

    def total(name):
        return sum(samples(text_, name).values()) - sum(samples(before, name).values())
    assert total("vlserve:request_params_n_count") == 1 and total("vlserve:request_params_n_sum") == 3
    assert total("vlserve:request_params_max_tokens_sum") == 5
    assert total("vlserve:request_generation_tokens_sum") == 15
    assert total("vlserve:iteration_tokens_total_count") >= 5  # a prefill, then a step per token
    assert total("vlserve:time_per_output_token_seconds_count") == 1
    info = samples(text_, "vlserve:cache_config_info")
    assert len(info) == 1 and 'block_size="16"' in next(iter(info)) and list(info.values()) == [1.0]


def test_metrics_prefix_vllm_names_them_as_vllm_does(tiny_ckpt):
    import asyncio

    from vlserve.config import EngineConfig
    from vlserve.engine.async_engine import AsyncEngine
    from vlserve.serve.api import ServerState, build_app

    engine = AsyncEngine(EngineConfig(model=str(tiny_ckpt), device="cpu", kv_cache_memory_gib=0.1), progress=False)
    try:
        app = build_app(ServerState(engine, "tiny", None, 8, metrics_prefix="vllm"))

        async def scrape():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://x") as c:
                return (await c.get("/metrics")).text
        text_ = asyncio.run(scrape())
    finally:
        engine.shutdown()
    assert all(has_family(text_, f"vllm:{family}") for family in VLLM_FAMILIES) and "vlserve:" not in text_


def test_echo_puts_the_prompt_before_each_choice(client, served):
    r = client.completions.create(model="tiny", prompt=["Once upon", "a time"], max_tokens=3, n=2, echo=True,
                                  extra_body={"ignore_eos": True})
    assert [c.text.startswith(("Once upon", "a time")[c.index // 2]) for c in r.choices] == [True] * 4
    chunks = raw_chunks(served, "completions", {"prompt": "Once upon", "max_tokens": 3, "echo": True,
                                                 "ignore_eos": True})
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts[0].startswith("Once upon") and not any(t.startswith("Once upon") for t in texts[1:])
    refused = post(served, "completions", {"prompt": "x", "echo": True, "logprobs": 1, "stream": True})
    assert refused.status_code == 400 and "come in whole responses only" in refused.text


def test_echo_with_logprobs_and_prompt_logprobs(client, served):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=2, echo=True, logprobs=2,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    ids = post(served, "../tokenize", {"prompt": "Once upon a time"}).json()["tokens"]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert all(len(top) in (2, 3) for top in lp.top_logprobs[1:])  # 2 most likely, and the token itself
    assert lp.text_offset[len(ids)] == len("Once upon a time")  # the output's offsets follow the prompt's
    chat = post(served, "chat/completions", {"messages": HELLO, "max_tokens": 1, "prompt_logprobs": 1})
    scores = chat.json()["prompt_logprobs"]
    prompt_ids = post(served, "../tokenize", {"messages": HELLO}).json()["tokens"]
    assert scores[0] is None and len(scores) == len(prompt_ids)
    for token_id, entry in zip(prompt_ids[1:], scores[1:]):
        assert str(token_id) in entry and len(entry) <= 2
        assert {e["rank"] for e in entry.values()} >= {1}
    whole = post(served, "completions", {"prompt": "Once upon a time", "max_tokens": 1, "prompt_logprobs": 0})
    (choice,) = whole.json()["choices"]
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(ids)


def test_truncate_prompt_tokens_keeps_the_end(served):
    r = post(served, "completions", {"prompt": "one two three four five six", "max_tokens": 1,
                                     "truncate_prompt_tokens": 3, "echo": True})
    assert r.json()["usage"]["prompt_tokens"] == 3 and r.json()["choices"][0]["text"].startswith(" four five six")


# ---- tool calls and structured output (random weights: the grammar, not the model, makes them valid) ----
TWO_TOOLS = [FUNCTION, {"type": "function", "function": {"name": "stop_here", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}]
ARGS_SCHEMA = FUNCTION["function"]["parameters"]
HERMES = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Lyon)", "days": [1-7]\}\}\n</tool_call>'


def test_required_tool_choice_calls_a_tool_with_valid_arguments(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, tools=TWO_TOOLS, tool_choice="required",
                                       max_tokens=120, n=2, seed=1, temperature=1.0, parallel_tool_calls=False)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id and call.type == "function"
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), ARGS_SCHEMA)
        else:
            assert call.function.name == "stop_here" and json.loads(call.function.arguments) == {}


def test_a_named_tool_choice_streams_its_arguments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model="tiny", messages=HELLO, tools=TWO_TOOLS, tool_choice=named,
                                           max_tokens=60, temperature=0.0)
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), ARGS_SCHEMA)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, tools=TWO_TOOLS, tool_choice=named,
                                                 max_tokens=60, temperature=0.0, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2  # arguments as they come
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_blocks(client, stream):
    # A regex makes the random model write what Qwen2.5 writes when it calls: the parser must find the call.
    kwargs = dict(model="tiny", messages=HELLO, tools=TWO_TOOLS, max_tokens=280, temperature=1.0, seed=3,
                  extra_body={"guided_regex": r"Let me check\.\n" + HERMES})
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, calls, reason = choice.message.content, choice.message.tool_calls, choice.finish_reason
    else:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        reason = chunks[-1].choices[0].finish_reason
        assert "<tool" not in content  # the tag's first characters were held back, never sent as content
    assert content.strip() == "Let me check." and reason == "tool_calls"
    (call,) = calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), ARGS_SCHEMA)


def test_tool_results_go_back_through_the_template(served):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "days": 2}'}}
    messages = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = post(served, "../tokenize", {"messages": messages, "tools": [FUNCTION], "return_token_strs": True})
    assert r.status_code == 200, r.text
    prompt = "".join(r.json()["token_strs"]).replace("Ġ", " ").replace("Ċ", "\n")
    assert '"name": "get_weather"' in prompt.split("\n</tools>")[0]  # the tool listed for the model
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    chat = post(served, "chat/completions", {"messages": messages, "tools": [FUNCTION], "tool_choice": "none",
                                             "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["tool_calls"] == [], chat.text


def test_response_formats_and_guided_fields_hold(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, n=2, temperature=1.0, seed=5,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": schema}})
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    choice = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0.0,
                                            extra_body={"guided_choice": ["red", "green"]}).choices[0]
    assert choice.message.content in ("red", "green") and choice.finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="code:", max_tokens=20, stream=True,
                                       extra_body={"guided_regex": r"[A-Z]{2}\d{3}", "n": 2})
    texts = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert len(texts) == 2 and all(re.fullmatch(r"[A-Z]{2}\d{3}", t) for t in texts.values()), texts


def test_logit_bias_and_allowed_token_ids_over_http(served):
    r = post(served, "completions", {"prompt": "x", "max_tokens": 3, "temperature": 0, "logit_bias": {"42": 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "KKK", r.text
    r = post(served, "completions", {"prompt": "x", "max_tokens": 6, "temperature": 1, "allowed_token_ids": [64, 65],
                                     "return_tokens_as_token_ids": True, "logprobs": 0})
    assert set(r.json()["choices"][0]["logprobs"]["tokens"]) <= {"token_id:64", "token_id:65"}, r.text
