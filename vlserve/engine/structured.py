"""Structured output: a grammar (a JSON schema, any JSON object, a regex, a choice, EBNF) that every sampled token
keeps valid, through xgrammar.

Three places, in a request's order:
- the input processor checks that the grammar parses (`check`; no tokenizer needed), so a bad schema is a 400
  before anything is queued;
- the engine core compiles it against the tokenizer in a background thread (`Grammars.compile`: a large schema
  takes a while, and the other requests keep decoding meanwhile), then gives each sample its own matcher;
- the sampler masks the rows that have a matcher (`mask`): xgrammar fills the allowed-token bitmask on the host,
  it reaches the logits' device without a host sync and is unpacked and applied there. The matcher advances on
  each token as it reaches the host (`advance`); so the scheduler does not schedule a sequence with a grammar
  while a step holding it is in flight, and its next mask always follows its last token.
"""

import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vlserve.engine.sampling_params import StructuredOutputsParams
from vlserve.errors import InvalidRequestError
from vlserve.transfer import device_tensor, to_device

log = logging.getLogger("vlserve.engine")
WHAT = {"json": "the JSON schema", "json_object": "the JSON object grammar", "regex": "the regex",
        "choice": "the choices", "grammar": "the grammar"}
ANY_OBJECT = '{"type": "object"}'  # OpenAI's json_object: a JSON object, any keys


def _xgr():
    import xgrammar  # imported on first use: a server that never sees a grammar does not pay for it

    return xgrammar


def grammar_of(params: StructuredOutputsParams):
    """The xgrammar Grammar of `params`; RuntimeError (xgrammar's) if it does not parse."""
    xgr, kind = _xgr(), params.kind
    if kind == "json":
        return xgr.Grammar.from_json_schema(params.json, any_whitespace=False, strict_mode=True)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema(ANY_OBJECT, any_whitespace=False, strict_mode=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(params.regex)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                             for c in params.choice))
    return xgr.Grammar.from_ebnf(params.grammar)


def check(params: StructuredOutputsParams | None) -> None:
    """Refuses a grammar that does not parse, with xgrammar's reason (its source location dropped)."""
    if params is None:
        return
    try:
        grammar_of(params)
    except (RuntimeError, ValueError) as e:
        reason = re.sub(r"^\[[^]]*\] \S+:\d+: ", "", str(e).strip())
        raise InvalidRequestError(f"{WHAT[params.kind]} of the structured output is not valid: {reason}"[:1000]) from e


class Grammars:
    """The engine core's compiler: one background thread (xgrammar itself compiles with several), its tokenizer
    info built there on first use (a second or so for Qwen's 152k tokens), compiled grammars cached by xgrammar."""

    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids):
        self.model_dir, self.vocab_size, self.stop_token_ids = model_dir, vocab_size, list(stop_token_ids)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vlserve-grammar")
        self.compiler = None

    def compile(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar (`matcher` turns it into one sample's state)."""
        return self.pool.submit(self._compile, params)

    def _compile(self, params: StructuredOutputsParams):
        if self.compiler is None:
            from vlserve.media.template import load_tokenizer

            xgr = _xgr()
            info = xgr.TokenizerInfo.from_huggingface(load_tokenizer(self.model_dir), vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self.compiler = xgr.GrammarCompiler(info)
        return self.compiler.compile_grammar(grammar_of(params))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def matcher(compiled):
    return _xgr().GrammarMatcher(compiled)


def advance(matcher, token: int) -> str | None:
    """Feeds the sampled token to the sequence's matcher; a finish reason when the grammar ends the sequence:
    "stop" once it is complete (its stop token accepted, even under ignore_eos), "abort" if the token broke it
    (the mask forbade it: a bug, logged)."""
    if not matcher.accept_token(token):
        log.error("token %d broke its sequence's grammar although the mask forbade it; ending the sequence", token)
        return "abort"
    return "stop" if matcher.is_terminated() else None


def mask(logits: torch.Tensor, seqs) -> torch.Tensor:
    """`logits` with every token the grammar forbids at -inf, in the rows whose sequence has one (a new tensor;
    `logits` itself when none has). The bitmask (1 bit a token) crosses to the device, not a boolean mask."""
    rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = _xgr().allocate_token_bitmask(len(rows), vocab)
    for j, i in enumerate(rows):
        seqs[i].grammar.fill_next_token_bitmask(bitmask, j)
    idx = device_tensor(rows, torch.long, logits.device)
    allowed = unpack_bits(to_device(bitmask, logits.device), vocab)
    return logits.index_put((idx,), logits[idx].masked_fill(~allowed, -float("inf")))


def unpack_bits(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, ceil(vocab / 32)) int32 words -> (rows, vocab) bools: token t is bit t % 32 of word t // 32."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
