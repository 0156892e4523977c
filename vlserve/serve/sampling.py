"""OpenAI requests -> engine inputs: sampling parameters, rendered chat prompt, fetched and preprocessed media.

Media fetching and preprocessing run in worker threads, so a slow download or a huge image never holds up the
event loop (and the engine thread decodes other requests meanwhile).
"""

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from vlserve.config import EngineConfig, ModelConfig
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import InvalidRequestError, MediaError
from vlserve.media.item import MediaItem
from vlserve.media.template import build_chat_prompt, load_chat_media
from vlserve.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass
class EngineRequest:
    prompt_token_ids: list[int]
    media: list[MediaItem]
    params: SamplingParams


def sampling_defaults(model_dir: str) -> dict:
    """The checkpoint's own sampling defaults (generation_config.json), used where a request sets none."""
    file = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: raw[k] for k in SAMPLING_DEFAULT_KEYS if isinstance(raw.get(k), (int, float))}


def sampling_params(req: SamplingFields, defaults: dict, max_tokens: int | None, logprobs: int | None
                    ) -> SamplingParams:
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
    )


async def prepare_chat(req: ChatCompletionRequest, tokenizer, cfg: ModelConfig, engine_cfg: EngineConfig,
                       defaults: dict) -> EngineRequest:
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true")
    params = sampling_params(req, defaults, req.max_completion_tokens or req.max_tokens,
                             (req.top_logprobs or 0) if req.logprobs else None)
    try:
        options = engine_cfg.media.updated(req.mm_processor_kwargs)
    except MediaError as e:
        raise InvalidRequestError(str(e)) from e
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    media = await asyncio.to_thread(load_chat_media, messages, engine_cfg.media_policy, options, cfg)
    prompt = build_chat_prompt(tokenizer, cfg, messages, media, req.add_generation_prompt)
    return EngineRequest(prompt.token_ids, prompt.media, params)


def prepare_completions(req: CompletionRequest, tokenizer, defaults: dict) -> list[EngineRequest]:
    """One engine request per prompt (OpenAI allows a batch of prompts in one call)."""
    params = sampling_params(req, defaults, req.max_tokens, req.logprobs)
    prompts = req.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise InvalidRequestError("prompt is empty; send a string, a list of token ids, or a list of those")
    requests = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        requests.append(EngineRequest(ids, [], params))
    return requests
