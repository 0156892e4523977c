"""When a sequence stops on tokens: the rules the engine core applies after each sampled token.

Stop strings are not here: they need text, which the output processor (front process) has; when one matches it
aborts the sample in the core, and drops any token the core sampled meanwhile.
"""

from vlserve.engine.sampling_params import SamplingParams
from vlserve.engine.sequence import Sequence


def stop_token_ids(params: SamplingParams, eos_ids) -> list[int]:
    """Token ids that end a sequence: the model's EOS ids (unless ignore_eos) and the request's own."""
    return ([] if params.ignore_eos else list(eos_ids)) + params.stop_token_ids


def is_stop_token(params: SamplingParams, token_id: int, num_output_tokens: int, eos_ids) -> bool:
    """`num_output_tokens` counts `token_id`; the first min_tokens outputs cannot stop the sequence."""
    return num_output_tokens > params.min_tokens and token_id in stop_token_ids(params, eos_ids)


def check_stop(seq: Sequence, token_id: int, eos_ids, max_model_len: int) -> str | None:
    """Finish reason after `token_id` was appended to seq.output_token_ids, or None. Sets seq.stop_reason to the
    request's own stop token id that matched (None for EOS, as vLLM)."""
    params = seq.params
    if is_stop_token(params, token_id, len(seq.output_token_ids), eos_ids):
        seq.stop_reason = token_id if token_id in params.stop_token_ids else None
        return "stop"
    if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None
