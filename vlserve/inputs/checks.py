"""The rules a request must pass before the engine sees it, one function each, cheapest first in the processor.

Each is called with what is known at that point: counts before any fetch, a lower bound on the prompt's tokens
before tokenizing (text characters / the longest token), media token counts from headers before decoding, exact
counts last. A refusal is an InvalidRequestError naming what to change.
"""

from vlserve.engine.request import Capacity
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import InvalidRequestError


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (byte-level BPE spells each byte
    as one character, so this bounds the bytes, hence the characters, of any token) or added token."""
    vocab = tokenizer.get_vocab()
    added = [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return max(max(map(len, vocab), default=1), max(map(len, added), default=1))


def min_text_tokens(num_chars: int, token_chars: int) -> int:
    """A lower bound on the tokens of `num_chars` characters of text: no token covers more than `token_chars`."""
    return -(-num_chars // token_chars)


def check_media_count(modalities: list[str], limits: dict[str, int]) -> None:
    for modality in ("image", "video"):
        count = modalities.count(modality)
        if count > limits.get(modality, 0):
            raise InvalidRequestError(
                f"the prompt has {count} {modality}(s), over the limit of {limits.get(modality, 0)}; send fewer or "
                f"raise --limit-mm-per-prompt '{{\"{modality}\": {count}}}'")


def check_length(num_tokens: int, max_tokens: int | None, max_model_len: int, exact: bool = True) -> None:
    """The prompt (with the requested output) must fit --max-model-len. `exact=False`: num_tokens is a lower
    bound (before tokenizing or decoding), so a refusal is already certain."""
    has = "has" if exact else "has at least"
    if num_tokens >= max_model_len:
        raise InvalidRequestError(
            f"the prompt {has} {num_tokens} tokens, but --max-model-len is {max_model_len} (prompt plus output); "
            "shorten the prompt (or use smaller images via max_pixels) or raise --max-model-len")
    if max_tokens is not None and num_tokens + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"max_tokens {max_tokens} plus the prompt's {'' if exact else 'at least '}{num_tokens} tokens exceed "
            f"--max-model-len {max_model_len}; ask for at most {max_model_len - num_tokens} tokens")


def check_fits(num_prompt_tokens: int, max_tokens: int, capacity: Capacity) -> None:
    """Refuses what could never run to the end alone in the KV cache: it would block the queue's head forever."""
    size = capacity.block_size
    need = -(-(num_prompt_tokens + max_tokens - 1) // size)  # the last token never needs its KV
    if need > capacity.num_kv_blocks:
        raise InvalidRequestError(
            f"the prompt ({num_prompt_tokens} tokens) plus up to {max_tokens} generated tokens needs {need} KV "
            f"blocks of {size} tokens, but the cache holds {capacity.num_kv_blocks}; lower max_tokens or "
            "--max-model-len, or give the KV cache more memory (--gpu-memory-utilization)")


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise InvalidRequestError("the prompt is empty; send at least one token")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})")


def check_indexed_ids(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias and allowed_token_ids index the logits: an id past the vocabulary would fault on the device."""
    bad = [t for t in params.indexed_token_ids() if t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids {bad[:5]} in logit_bias or allowed_token_ids are not in this model's "
                                  f"vocabulary (0 to {vocab_size - 1})")


def check_prompt_logprobs(num_tokens: int, params: SamplingParams, config) -> None:
    """Prompt logprobs take a logits row per prompt token, at most --max-num-seqs a step (the memory the engine
    sized): a longer prompt must be split over steps, which needs chunked prefill."""
    if params.prompt_logprobs is not None and not config.enable_chunked_prefill and num_tokens >= config.max_num_seqs:
        raise InvalidRequestError(
            f"prompt_logprobs for a prompt of {num_tokens} tokens needs chunked prefill (its logits are computed "
            f"{config.max_num_seqs} rows a step, --max-num-seqs); start the server without "
            "--no-enable-chunked-prefill, or send a prompt under that length")
