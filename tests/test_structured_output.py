"""Structured output (xgrammar), logit_bias and allowed_token_ids in the engine: with random weights the grammar,
not the model, makes the output valid."""

import json
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr

from vlserve import LLM, SamplingParams
from vlserve.engine.sampler import Sampler
from vlserve.engine.sampling_params import StructuredOutputsParams as Structured
from vlserve.engine.sequence import Sequence
from vlserve.engine.structured import advance, unpack_bits
from vlserve.errors import InvalidRequestError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
REGEX = r"[a-c]{3}-\d{2}"
CHOICES = ["yes", "no way", "maybe \"so\""]
EBNF = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'


@pytest.fixture(scope="module")
def llm(tiny_ckpt, device):
    return LLM(tiny_ckpt, max_model_len=512, max_num_seqs=8, device=device)


def test_bitmask_unpacks_as_xgrammar_applies_it():
    vocab = 100
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(0))
    logits = torch.randn(3, vocab)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    assert torch.equal(logits.masked_fill(~unpack_bits(bitmask, vocab), -float("inf")), expected)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_kind_of_grammar_holds_with_random_weights(llm, temperature):
    kinds = [Structured(json=SCHEMA), Structured(json_object=True), Structured(regex=REGEX),
             Structured(choice=CHOICES), Structured(grammar=EBNF)]
    params = [SamplingParams(temperature=temperature, max_tokens=120, n=2, seed=7, structured_outputs=s)
              for s in kinds]
    # Any object's keys are unbounded: a random model rarely closes one; the bias on "{}" (one token) makes it
    # close at once, where the grammar allows it.
    params[1].logit_bias = {llm.tokenizer.encode("{}")[0]: 100.0}
    outs = llm.generate(["tell me", "json please", "code:", "answer", "sum"], params, use_tqdm=False)
    for out in outs:
        assert all(o.finish_reason == "stop" for o in out.outputs), [o.text for o in out.outputs]
    for o in outs[0].outputs:
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert all(isinstance(json.loads(o.text), dict) for o in outs[1].outputs)
    assert all(re.fullmatch(REGEX, o.text) for o in outs[2].outputs)
    assert all(o.text in CHOICES for o in outs[3].outputs)
    assert all(re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", o.text) for o in outs[4].outputs)


def test_a_grammar_leaves_the_other_rows_of_its_batch_alone(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["a plain prompt", "another one"], plain, use_tqdm=False)
    mixed = llm.generate(["a plain prompt", "json", "another one"],
                         [plain, SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=Structured(
                             json=SCHEMA)), plain], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMA)


@pytest.mark.parametrize("structured, says", [
    (Structured(json='{"type": "objectx"}'), "JSON schema of the structured output is not valid: Unsupported type"),
    (Structured(json="{not json"), "JSON schema"),
    (Structured(regex="(abc"), "regex of the structured output is not valid"),
    (Structured(grammar="root ::= foo"), 'Rule "foo" is not defined'),
])
def test_a_grammar_that_does_not_parse_is_refused_before_it_is_queued(llm, structured, says):
    with pytest.raises(InvalidRequestError, match=re.escape(says)):
        llm.generate(["x"], SamplingParams(structured_outputs=structured), use_tqdm=False)
    assert not llm.core.has_unfinished()


@pytest.mark.parametrize("kwargs, says", [
    ({}, "exactly one of"),
    ({"json": "{}", "regex": "a"}, "exactly one of"),
    ({"choice": []}, "non-empty strings"),
    ({"json_object": False}, "exactly one of"),
    ({"regex": "a" * 70000}, "over the limit"),
])
def test_structured_output_params_are_checked(kwargs, says):
    with pytest.raises(InvalidRequestError, match=says):
        Structured(**kwargs)


def test_min_tokens_cannot_fight_a_grammar():
    with pytest.raises(InvalidRequestError, match="min_tokens cannot be combined"):
        SamplingParams(min_tokens=2, structured_outputs=Structured(choice=["a"]))


def test_logit_bias_and_allowed_token_ids(llm):
    biased = llm.generate(["hi"], SamplingParams(temperature=0.0, max_tokens=4, logit_bias={42: 100}),
                          use_tqdm=False)
    assert biased[0].outputs[0].token_ids == [42] * 4
    allowed = llm.generate(["hi"], SamplingParams(temperature=1.0, max_tokens=16, allowed_token_ids=[10, 11, 12],
                                                  seed=3), use_tqdm=False)
    assert set(allowed[0].outputs[0].token_ids) <= {10, 11, 12}
    both = llm.generate(["hi"], SamplingParams(temperature=0.0, max_tokens=3, allowed_token_ids=[7, 8],
                                               logit_bias={8: 100}), use_tqdm=False)
    assert both[0].outputs[0].token_ids == [8, 8, 8]


def test_sampler_rules_keep_logprobs_raw():
    logits = torch.randn(1, 64)
    out = Sampler((60,))(logits.clone(), [Sequence("r", [1], SamplingParams(
        temperature=0.0, logit_bias={3: 100}, logprobs=1))])
    assert out.token_ids == [3]
    assert out.logprobs[0].logprob == pytest.approx(logits.log_softmax(-1)[0, 3].item(), abs=1e-5)


@pytest.mark.parametrize("params, says", [
    (SamplingParams(logit_bias={10**6: 1.0}), "not in this model's vocabulary"),
    (SamplingParams(allowed_token_ids=[5, 10**7]), "not in this model's vocabulary"),
])
def test_ids_past_the_vocabulary_are_refused(llm, params, says):
    with pytest.raises(InvalidRequestError, match=says):
        llm.generate(["x"], params, use_tqdm=False)


@pytest.mark.parametrize("kwargs, says", [
    ({"logit_bias": {1: 101}}, "biases in \\[-100, 100\\]"),
    ({"logit_bias": {-1: 1}}, "map token ids"),
    ({"logit_bias": {i: 1 for i in range(1025)}}, "at most 1024"),
    ({"allowed_token_ids": []}, "non-empty list"),
])
def test_bias_and_allowed_shapes(kwargs, says):
    with pytest.raises(InvalidRequestError, match=says):
        SamplingParams(**kwargs)


def test_the_matcher_ends_a_sequence_when_its_grammar_does(tiny_ckpt):
    from vlserve.engine.structured import Grammars, matcher

    grammars = Grammars(tiny_ckpt, 151936, [151645])
    m = matcher(grammars.compile(Structured(choice=["ab"])).result(timeout=60))
    grammars.shutdown()
    ids = [t for t in llm_tokenizer(tiny_ckpt).encode("ab")]
    assert [advance(m, t) for t in ids] == [None] * len(ids)
    assert advance(m, 151645) == "stop"  # the stop token, once the grammar is complete
    m.reset()
    assert advance(m, llm_tokenizer(tiny_ckpt).encode("z")[0]) == "abort"


def llm_tokenizer(model_dir):
    from vlserve.media.template import load_tokenizer

    return load_tokenizer(model_dir)


def test_a_compile_that_fails_in_the_core_ends_its_request(llm, monkeypatch):
    def broken(params):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(llm.core.grammars, "_compile", broken)
    out = llm.generate(["x"], SamplingParams(n=2, structured_outputs=Structured(regex="a+")), use_tqdm=False)
    assert [o.finish_reason for o in out[0].outputs] == ["abort", "abort"]
    assert not llm.core.has_unfinished()


def test_abort_while_compiling(llm):
    from vlserve.engine.request import EngineRequest

    params = SamplingParams(structured_outputs=Structured(regex="b+"))
    llm.core.add(EngineRequest("compiling", [1, 2, 3], params, max_tokens=4))
    llm.core.abort("compiling")
    assert not llm.core.has_unfinished()
