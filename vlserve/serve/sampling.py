"""OpenAI request fields -> SamplingParams, with the checkpoint's own defaults where a request sets none."""

import json
from pathlib import Path

from vlserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from vlserve.serve.protocol import SamplingFields

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_defaults(model_dir: str) -> dict:
    """The checkpoint's own sampling defaults (generation_config.json), used where a request sets none."""
    file = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: raw[k] for k in SAMPLING_DEFAULT_KEYS if isinstance(raw.get(k), (int, float))}


def sampling_params(req: SamplingFields, defaults: dict, max_tokens: int | None, logprobs: int | None,
                    structured: StructuredOutputsParams | None = None, prompt_logprobs: int | None = None
                    ) -> SamplingParams:
    """`structured`: the request's grammar (SamplingFields.structured, or the one tool_choice imposes);
    `prompt_logprobs`: as the request asks, or more (completions' echo with logprobs)."""
    def pick(name: str, fallback):
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    return SamplingParams(
        n=req.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []), max_tokens=max_tokens, min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
        logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
        allowed_token_ids=req.allowed_token_ids, structured_outputs=structured,
        prompt_logprobs=req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
        truncate_prompt_tokens=req.truncate_prompt_tokens,
    )
