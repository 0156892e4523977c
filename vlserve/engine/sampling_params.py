"""How to pick tokens and when to stop: the per-request knobs of the OpenAI API, checked before scheduling."""

import json
from dataclasses import dataclass, field, fields

from vlserve.errors import InvalidRequestError

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
# The sampler filters, sorts and takes logprobs of this many logits at a time (27 rows of Qwen's 152k vocabulary),
# so its temporaries stay bounded however many sequences sample at once; the planner counts them (plan/memory.py).
SAMPLER_CHUNK_ELEMENTS = 1 << 22


def sampler_chunk_rows(vocab: int) -> int:
    return max(1, SAMPLER_CHUNK_ELEMENTS // vocab)
MAX_N = 128  # as OpenAI's n; each sample is a sequence, so an unbounded n could stall the engine
# Stop strings are searched in every sample's text at every token: bounded, so a request cannot slow every step
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
INT64 = (-(2**63), 2**63 - 1)  # integers travel to the engine core as 64-bit values
MAX_LOGIT_BIAS = 1024  # entries: each is one index write per step
MAX_GRAMMAR_CHARS = 1 << 16  # a schema, regex or grammar; xgrammar compiles it in the engine core
MAX_CHOICES = 1024


@dataclass
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's StructuredOutputsParams): exactly one field set. `json` is a JSON
    schema (a dict or its text), `json_object` any JSON object, `regex` a regular expression, `choice` one of the
    strings, `grammar` an EBNF grammar (xgrammar's dialect, GBNF-like, with a `root` rule)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json)  # one form across the process boundary
        self.validate()

    @property
    def kind(self) -> str:
        return self.given()[0]

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]

    def validate(self) -> None:
        given = self.given()
        if len(given) != 1:
            raise InvalidRequestError(f"structured output takes exactly one of json, regex, choice, grammar, "
                                      f"json_object; got {given or 'none'}")
        value = getattr(self, given[0])
        if given[0] == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidRequestError("choice must be a list of non-empty strings")
            if len(value) > MAX_CHOICES or sum(map(len, value)) > MAX_GRAMMAR_CHARS:
                raise InvalidRequestError(f"choice takes at most {MAX_CHOICES} strings of {MAX_GRAMMAR_CHARS} "
                                          f"characters in all, got {len(value)}")
        elif given[0] == "json_object":
            if value is not True:
                raise InvalidRequestError(f"json_object must be true, got {value!r}"[:200])
        elif not isinstance(value, str) or not value:
            raise InvalidRequestError(f"{given[0]} must be a non-empty string, got {type(value).__name__}")
        elif len(value) > MAX_GRAMMAR_CHARS:
            raise InvalidRequestError(f"{given[0]} has {len(value)} characters, over the limit of "
                                      f"{MAX_GRAMMAR_CHARS}; send a smaller one")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's own (ignore_eos drops those)
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each sampled token's logprob
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids (OpenAI: -100 to 100)
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM's)
    structured_outputs: StructuredOutputsParams | None = None
    prompt_logprobs: int | None = None  # logprob of each prompt token and this many most likely (vLLM's)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last N tokens (-1: --max-model-len's worth)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise InvalidRequestError(f"{name} {why}")

        def number(name: str, value, ints: bool = False):
            kinds = (int,) if ints else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                bad(name, f"must be {'an integer' if ints else 'a number'}, got {value!r}"[:200])
            if ints and not INT64[0] <= value <= INT64[1]:
                bad(name, f"must fit in a signed 64-bit integer ([{INT64[0]}, {INT64[1]}]), got {value}"[:200])

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            number(name, getattr(self, name))
        for name in ("n", "top_k", "min_tokens"):
            number(name, getattr(self, name), ints=True)
        if not 1 <= self.n <= MAX_N:
            bad("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad("top_k", f"must be -1 or 0 (off) or a positive count, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None:
            number("max_tokens", self.max_tokens, ints=True)
            if self.max_tokens < 1:
                bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens}")
        if self.seed is not None:
            number("seed", self.seed, ints=True)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"must be a non-empty string or a list of them, got {self.stop!r}"[:200])
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            bad("stop", f"takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters "
                        f"each, got {len(self.stop)} (longest {max(map(len, self.stop))})")
        if not isinstance(self.stop_token_ids, list) or not all(map(_token_id, self.stop_token_ids)):
            bad("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}"[:200])
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        self.validate_token_choices(bad)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                bad("structured_outputs", "must be a StructuredOutputsParams")
            if self.min_tokens:
                bad("min_tokens", "cannot be combined with structured output: the grammar decides where the output "
                                  "may end; drop min_tokens")
        if self.truncate_prompt_tokens is not None:
            number("truncate_prompt_tokens", self.truncate_prompt_tokens, ints=True)
            if self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1:
                bad("truncate_prompt_tokens", f"must be a positive count or -1, got {self.truncate_prompt_tokens}")
        for name in ("prompt_logprobs", "logprobs"):
            value = getattr(self, name)
            if value is not None:
                number(name, value, ints=True)
                if not 0 <= value <= MAX_LOGPROBS:
                    bad(name, f"must be in [0, {MAX_LOGPROBS}], got {value}")

    def validate_token_choices(self, bad) -> None:
        """logit_bias and allowed_token_ids: their shapes and sizes (the input processor checks the ids against the
        model's vocabulary)."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    _token_id(t) and isinstance(b, (int, float)) and not isinstance(b, bool) and -100 <= b <= 100
                    for t, b in self.logit_bias.items()):
                bad("logit_bias", f"must map token ids to biases in [-100, 100], got {self.logit_bias!r}"[:200])
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad("logit_bias", f"takes at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids or not all(
                    map(_token_id, self.allowed_token_ids)):
                bad("allowed_token_ids", f"must be a non-empty list of token ids, got {self.allowed_token_ids!r}"[:200])

    def indexed_token_ids(self) -> list[int]:
        """The token ids the sampler indexes the logits with (bias, allowed): the input processor checks them
        against the model's vocabulary (stop token ids beyond it are harmless: never sampled)."""
        return [*(self.logit_bias or ()), *(self.allowed_token_ids or ())]


def _token_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64[1]
