"""Token ids -> streamed text, and where a stop string ends it (front process, off the engine core).

Per new token of a sample the output processor does:

    delta = detok.add(token_id)  # text safe to stream ("" while a character or a possible stop string is pending)
    if detok.stop_str is not None or the core finished the sample: delta += detok.flush()
"""

from transformers import PreTrainedTokenizerBase

from vlserve.config import DEFAULT_STOP_TOKEN_IDS
from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.stop import is_stop_token

REPLACEMENT = "\ufffd"  # what decoding yields for the bytes of a character not complete yet
CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the output: SentencePiece drops a leading space at the start


class IncrementalDetokenizer:
    """Decodes one sequence's output a few tokens at a time, emitting only complete characters.

    Each step decodes a small window: the tokens of the last emitted chunk (the prefix) plus the tokens not
    emitted yet, and emits what the window adds beyond the prefix's text, unless that ends in U+FFFD (a
    character whose remaining bytes are in tokens still to come). Stop strings are searched in the output
    text; text that could be the start of one is held back until it is clear.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams,
                 eos_ids=DEFAULT_STOP_TOKEN_IDS):
        self.tokenizer, self.params, self.eos_ids = tokenizer, params, tuple(eos_ids)
        context = prompt_token_ids[-CONTEXT_TOKENS:]
        if self._decode(context).endswith(REPLACEMENT):
            context = []  # the prompt ends inside a character: its text would not be a prefix of the window's
        self.window = list(context)
        self.read = len(context)  # window[:read] is the prefix: already decoded (last chunk, or prompt context)
        self.num_tokens = 0  # output tokens seen, stop tokens included
        self.text = ""  # output text so far, cut at a matched stop string; complete after flush()
        self.emitted = 0  # characters of self.text already returned
        self.stop_str: str | None = None  # the stop string that matched
        self.max_stop_len = max(map(len, params.stop), default=0)

    def add(self, token_id: int) -> str:
        """Feed one output token; returns the new text safe to emit."""
        self.num_tokens += 1
        if self.stop_str is not None or is_stop_token(self.params, token_id, self.num_tokens, self.eos_ids):
            return ""  # the token that ends the sequence is not text, nor anything sampled after a stop string
        self.window.append(token_id)
        prefix = self._decode(self.window[:self.read])
        text = self._decode(self.window)
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT):
            return ""  # a skipped special token, or a character not complete yet
        self.window = self.window[self.read:]
        self.read = len(self.window)
        return self._release(text[len(prefix):], final=False)

    def flush(self) -> str:
        """At the end: the text still held back, and undecodable trailing bytes (as U+FFFD, like decode)."""
        prefix = self._decode(self.window[:self.read])
        text = self._decode(self.window)
        self.window, self.read = [], 0
        return self._release(text[len(prefix):], final=True)

    def _decode(self, ids: list[int]) -> str:
        # The Rust tokenizer itself: what tokenizer.decode(..., clean_up_tokenization_spaces=False) returns, in a
        # third of the time (twice per sequence per step adds up). No space clean-up: it looks across token
        # boundaries, so windows would not add up to the whole.
        return self.tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def _release(self, new_text: str, final: bool) -> str:
        self.text += new_text
        hold = 0
        if self.params.stop and self.num_tokens > self.params.min_tokens and not self._cut_at_stop() and not final:
            hold = self._held_back()
        end = len(self.text) - hold
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def _cut_at_stop(self) -> bool:
        # Text already emitted holds no start of a stop string (it was held back), so search only the rest.
        found = [(i, s) for s in self.params.stop if (i := self.text.find(s, self.emitted)) >= 0]
        if not found:
            return False
        i, self.stop_str = min(found)
        self.text = self.text[:i + len(self.stop_str) if self.params.include_stop_str_in_output else i]
        return True

    def _held_back(self) -> int:
        """Length of the longest end of the unemitted text that begins some stop string."""
        for k in range(min(self.max_stop_len - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return k
        return 0
