"""Incremental detokenization with the real Qwen2.5 tokenizer, stop strings, and the stop rules: the core's (stop
tokens, lengths) and the output processor's (stop strings), together as a request meets them."""

import random

import pytest

from vlserve.config import DEFAULT_STOP_TOKEN_IDS
from vlserve.engine.detokenizer import IncrementalDetokenizer
from vlserve.engine.output_processor import OutputProcessor
from vlserve.engine.request import CoreOutput, EngineRequest
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.sequence import Sequence
from vlserve.engine.stop import check_stop
from vlserve.media.template import load_tokenizer

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
TEXTS = {
    "english": "Hello world, this is a test.\n\nObservation: done",
    "chinese": "你好，世界！今天天气很好。龘靐齉",
    "emoji": "👨‍👩‍👧‍👦 🇯🇵🇺🇸 🏳️‍🌈 😀👍🏽",
    "mixed": "Qwen2.5-VL 支持图片🖼️和视频🎬, ok? Ünïcödé ≠ ascii",
}


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def stream(tok, ids, **params):
    """(deltas, flushed text, detokenizer) for ids fed one at a time."""
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), SamplingParams(**params))
    deltas = [detok.add(t) for t in ids]
    return deltas, detok.flush(), detok


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_stream_equals_decode(tok, name):
    ids = tok.encode(TEXTS[name])
    deltas, rest, detok = stream(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids) == TEXTS[name]
    assert rest == "" and detok.text == TEXTS[name]
    assert not any("\ufffd" in d for d in deltas)


def test_multi_token_characters_wait_until_complete(tok):
    # " 支" is one character over two tokens; the flag is two regional indicators over four.
    for text, expected in ((" 支", ["", " 支"]), (" 🇯🇵", ["", "", " 🇯", "🇵"])):
        ids = tok.encode(text)
        assert "\ufffd" in tok.decode(ids[:1])
        assert stream(tok, ids)[0] == expected


def test_random_tokens_still_add_up(tok):
    # Arbitrary byte-level tokens (broken UTF-8 included): the stream still equals one decode.
    rng = random.Random(0)
    ids = [rng.randrange(ENDOFTEXT) for _ in range(300)]
    deltas, rest, _ = stream(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids)


def test_special_tokens(tok):
    ids = tok.encode("Hi") + [IM_START] + tok.encode("there")
    assert "".join(stream(tok, ids)[0]) == "Hithere"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "Hi<|im_start|>there"


def test_stop_token_is_not_text(tok):
    ids = tok.encode("Hi") + [IM_END]
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "Hi"
    # With ignore_eos, <|im_end|> is just another token; the request's stop_token_ids still aren't text.
    full = "".join(stream(tok, ids, skip_special_tokens=False, ignore_eos=True)[0])
    assert full == "Hi<|im_end|>"
    comma = tok.encode(",")[0]
    assert "".join(stream(tok, tok.encode("Hi,"), stop_token_ids=[comma])[0]) == "Hi"


def stop_case(tok, text, stop, **params):
    ids = tok.encode(text)
    deltas, rest, detok = stream(tok, ids, stop=stop, **params)
    out = "".join(deltas) + rest
    # No delta ever shows a stop string, even split across deltas (unless asked to include it).
    if not params.get("include_stop_str_in_output"):
        for i in range(len(deltas)):
            assert not any(s in "".join(deltas[:i + 1]) for s in detok.params.stop)
    return deltas, rest, out, detok


def test_stop_string_spanning_tokens(tok):
    _, rest, out, detok = stop_case(tok, TEXTS["english"], ["is a test"])
    assert out == "Hello world, this " and detok.stop_str == "is a test" and rest == ""


def test_stop_string_starting_inside_a_token(tok):
    # "lo w" starts inside "Hello": "Hel" is emitted at once, "lo" is held back until " world" settles it.
    deltas, _, out, detok = stop_case(tok, "Hello world", ["lo w"])
    assert deltas == ["Hel", ""] and out == "Hel" and detok.stop_str == "lo w"
    # Not a stop string after all: the held-back text is released.
    deltas, _, out, detok = stop_case(tok, "Hello there", ["lo w"])
    assert deltas == ["Hel", "lo there"] and out == "Hello there" and detok.stop_str is None


def test_held_back_text_released_at_flush(tok):
    deltas, rest, out, detok = stop_case(tok, "Hello", ["lo w"])
    assert deltas == ["Hel"] and rest == "lo" and detok.stop_str is None


def test_stop_string_in_multibyte_text(tok):
    # " 支" is split over two tokens whose first also carries the space before the stop string.
    _, _, out, detok = stop_case(tok, TEXTS["mixed"], ["支持"])
    assert out == "Qwen2.5-VL " and detok.stop_str == "支持"
    _, _, out, _ = stop_case(tok, TEXTS["emoji"], ["🇺🇸"])
    assert out == "👨‍👩‍👧‍👦 🇯🇵"


def test_earliest_stop_string_wins(tok):
    _, _, out, detok = stop_case(tok, TEXTS["english"], ["test", "world, this is"])
    assert out == "Hello " and detok.stop_str == "world, this is"


def test_include_stop_str_in_output(tok):
    _, _, out, detok = stop_case(tok, "Hello world, again", ["lo w"], include_stop_str_in_output=True)
    assert out == "Hello w" and detok.stop_str == "lo w"


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("a b a b a b")
    assert [tok.decode([t]) for t in ids[:4]] == ["a", " b", " a", " b"]
    deltas, _, detok = stream(tok, ids, stop=["b"], min_tokens=3)  # the first " b" is within min_tokens
    assert "".join(deltas) == "a b a " and detok.stop_str == "b"


def finish(tok, ids, max_model_len=10_000, **params):
    """Feeds ids as the engine core (check_stop) and the output processor (text, stop strings) do; returns
    (finish_reason, stop_reason, text, tokens consumed)."""
    prompt, params = tok.encode(PROMPT), SamplingParams(**params)
    max_tokens = params.max_tokens or max_model_len - len(prompt)
    seq = Sequence("r", prompt, params, max_tokens=max_tokens)
    outputs = OutputProcessor(tok)
    outputs.add(EngineRequest("r", prompt, params, max_tokens))
    text = ""
    for t in ids:
        seq.output_token_ids.append(t)
        reason = check_stop(seq, t, DEFAULT_STOP_TOKEN_IDS, max_model_len)
        (out,) = outputs.process([CoreOutput("r", 0, [t], finish_reason=reason, stop_reason=seq.stop_reason)]).outputs
        (delta,) = out.outputs
        text += delta.text
        if delta.finish_reason:
            return delta.finish_reason, delta.stop_reason, text, len(seq.output_token_ids)
    return None, None, text, len(seq.output_token_ids)  # not finished: what was safe to stream


def test_check_stop_reasons(tok):
    hi = tok.encode("Hi there friend")  # 3 tokens
    assert finish(tok, hi + [IM_END] + hi) == ("stop", None, "Hi there friend", 4)
    assert finish(tok, hi + [ENDOFTEXT] + hi) == ("stop", None, "Hi there friend", 4)
    assert finish(tok, hi + hi, stop_token_ids=[hi[1]]) == ("stop", hi[1], "Hi", 2)
    assert finish(tok, hi + hi, max_tokens=2) == ("length", None, "Hi there", 2)
    full = len(tok.encode(PROMPT)) + 4
    assert finish(tok, hi + hi, max_model_len=full, max_tokens=None) == ("length", None, "Hi there friendHi", 4)
    assert finish(tok, hi + hi, stop=["re fr"]) == ("stop", "re fr", "Hi the", 3)
    assert finish(tok, hi) == (None, None, "Hi there friend", 3)


def test_check_stop_min_tokens_and_ignore_eos(tok):
    hi = tok.encode("Hi there friend")
    # EOS as the 2nd output token with min_tokens=2: not a stop (the sampler would not even pick it).
    reason, _, text, n = finish(tok, hi[:1] + [IM_END] + hi[1:] + [IM_END], min_tokens=2)
    assert (reason, text, n) == ("stop", "Hi there friend", 5)
    reason, _, text, n = finish(tok, hi + [IM_END, ENDOFTEXT] + hi, ignore_eos=True, max_tokens=6,
                                skip_special_tokens=False)
    assert (reason, text, n) == ("length", "Hi there friend<|im_end|><|endoftext|>Hi", 6)
    # ignore_eos drops only the model's EOS ids, not the request's stop_token_ids.
    assert finish(tok, hi + [IM_END] + hi, ignore_eos=True, stop_token_ids=[IM_END])[:2] == ("stop", IM_END)
