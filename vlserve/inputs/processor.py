"""The input processor: the one way any front door (HTTP chat and completions, `LLM.generate`/`LLM.chat`, the
benchmarks) turns a request into a validated EngineRequest.

Rules run cheapest first, each once (inputs/checks.py): sampling parameters (token ids against the vocabulary, the
structured output's grammar parsed) and per-request media options (which may only tighten the server's), media
counts before anything is fetched, a lower bound on the prompt's tokens
before tokenizing, each item's token count from its header before any pixel is decoded, the exact prompt length
and KV fit after tokenizing; then pixels, pad expansion and M-RoPE positions. A refused request has cost at most
its own bytes and headers. Thread-safe: the server runs several requests at once in a thread pool.
"""

from collections.abc import Callable
from typing import Any

from PIL import Image

from vlserve.config import EngineConfig, ModelConfig
from vlserve.engine.request import Capacity, EngineRequest
from vlserve.engine import structured
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import InvalidRequestError, MediaError
from vlserve.inputs import checks
from vlserve.inputs.media import fetch, located, preprocess, probe
from vlserve.media.item import MediaItem
from vlserve.media.options import grid_tokens
from vlserve.media.positions import mrope_positions
from vlserve.media.template import (
    MediaRef, Rendering, check_placeholders, expand_media_tokens, load_tokenizer, parse_messages, render_chat,
    text_tokens_around,
)

MODALITIES = ("image", "video")


class InputProcessor:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer, capacity: Capacity):
        self.config, self.model_config, self.tokenizer, self.capacity = config, model_config, tokenizer, capacity
        self.limits = dict(config.limit_mm_per_prompt)
        self.token_chars = checks.max_token_chars(tokenizer)
        vision = model_config.vision
        self.media = config.media.for_vision(vision) if vision else config.media  # the checkpoint's patch geometry

    @classmethod
    def for_model(cls, config: EngineConfig, capacity: Capacity | None = None) -> "InputProcessor":
        """From the checkpoint folder alone; without the core's capacity, the KV check assumes room for one
        sequence of max_model_len."""
        cfg = ModelConfig.from_dir(config.model)
        max_len = config.model_len(cfg)
        capacity = capacity or Capacity(max_len, -(-max_len // config.block_size), config.block_size)
        return cls(config, cfg, load_tokenizer(config.tokenizer_dir, config.chat_template), capacity)

    def chat(self, request_id: str, messages: Any, params: SamplingParams, mm_kwargs: dict | None = None,
             rendering: Rendering = Rendering()) -> EngineRequest:
        """OpenAI/Qwen-style messages (text, image_url, video_url, image, video parts), rendered as `rendering`
        says."""
        chat, refs = parse_messages(messages, self.model_config)
        return self.build(request_id, params, refs, mm_kwargs, text_chars(chat),
                          lambda: render_chat(self.tokenizer, self.model_config, chat, rendering))

    def prompt(self, request_id: str, prompt: str | list[int], params: SamplingParams,
               multi_modal_data: dict | None = None, mm_kwargs: dict | None = None) -> EngineRequest:
        """A text or token-id prompt holding one <|image_pad|>/<|video_pad|> per item of `multi_modal_data`
        ({"image": [...], "video": [...]}: URLs, paths, bytes, PIL images), images first."""
        refs = media_refs(multi_modal_data or {})
        if isinstance(prompt, str):
            return self.build(request_id, params, refs, mm_kwargs, len(prompt),
                              lambda: self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not isinstance(prompt, list):
            raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return self.build(request_id, params, refs, mm_kwargs, 0, lambda: list(prompt))

    def build(self, request_id: str, params: SamplingParams, refs: list[MediaRef], mm_kwargs: dict | None,
              text_chars: int, tokenize: Callable[[], list[int]]) -> EngineRequest:
        max_len = self.capacity.max_model_len
        checks.check_indexed_ids(params, self.model_config.vocab_size)
        structured.check(params.structured_outputs)  # parses the grammar: milliseconds, before any media fetch
        checks.check_media_count([ref.modality for ref in refs], self.limits)
        self.item_options(None, mm_kwargs)  # the request's own media options are checked even without media
        options = [self.item_options(ref, mm_kwargs) for ref in refs]
        keep = self.kept_tokens(params)
        text_tokens = min(checks.min_text_tokens(text_chars, self.token_chars), keep or max_len)
        checks.check_length(text_tokens + len(refs), params.max_tokens, max_len, exact=False)
        sources, media_tokens, cfg = [], 0, self.model_config
        for ref, opts in zip(refs, options):  # each item's bytes, then its size: refused at the first too many
            sources.append(self.located(fetch, ref, ref, self.config.media_policy, opts))
            grid = self.located(probe, ref, sources[-1])
            media_tokens += grid_tokens(grid, self.media.merge_size) + text_tokens_around(ref.modality, grid, cfg)
            checks.check_length(text_tokens + media_tokens, params.max_tokens, max_len, exact=False)
        ids = tokenize()
        if keep is not None and len(ids) > keep:
            if refs:
                raise InvalidRequestError(f"truncate_prompt_tokens {keep} would drop the first {len(ids) - keep} "
                                          "tokens of a prompt with images or videos; vlserve truncates text prompts "
                                          "only: send a shorter one")
            ids = ids[-keep:]
        checks.check_token_ids(ids, self.model_config.vocab_size)
        check_placeholders(ids, [ref.modality for ref in refs], self.model_config)
        self.check_prompt(len(ids) - len(refs) + media_tokens, params)
        items = [self.located(preprocess, src.ref, src) for src in sources]
        return self.engine_request(request_id, ids, items, params)

    def kept_tokens(self, params: SamplingParams) -> int | None:
        """truncate_prompt_tokens as a count (-1: as many as --max-model-len leaves room for)."""
        keep = params.truncate_prompt_tokens
        return self.capacity.max_model_len - (params.max_tokens or 1) if keep == -1 else keep

    def item_options(self, ref: MediaRef | None, mm_kwargs: dict | None):
        """The server's media options, tightened by the request's mm_processor_kwargs, then by the part's own."""
        try:
            return self.media.tightened({**(mm_kwargs or {}), **(ref.overrides if ref else {})})
        except MediaError as e:
            raise located(ref, e) if ref else e

    def check_prompt(self, num_tokens: int, params: SamplingParams) -> None:
        checks.check_length(num_tokens, params.max_tokens, self.capacity.max_model_len)
        checks.check_fits(num_tokens, self.max_tokens(num_tokens, params), self.capacity)
        checks.check_prompt_logprobs(num_tokens, params, self.config)

    def max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        return params.max_tokens or self.capacity.max_model_len - num_prompt_tokens

    @staticmethod
    def located(fn, ref: MediaRef, *args):
        try:
            return fn(*args)
        except MediaError as e:
            raise located(ref, e) from e

    def engine_request(self, request_id: str, ids: list[int], items: list[MediaItem],
                       params: SamplingParams) -> EngineRequest:
        expanded, spans = expand_media_tokens(ids, items, self.model_config, self.tokenizer)
        if items:  # exact now: a video whose container miscounted its frames, Qwen3-VL's timestamps
            self.check_prompt(len(expanded), params)
        positions, delta = mrope_positions(len(expanded), spans, self.model_config) if items else (None, 0)
        return EngineRequest(request_id, expanded, params, self.max_tokens(len(expanded), params), spans,
                             positions, delta)


def text_chars(chat: list[dict]) -> int:
    """Characters of text in parsed messages (parse_messages' form: content a string or a list of parts)."""
    total = 0
    for message in chat:
        content = message["content"]
        total += len(content) if isinstance(content, str) else sum(len(p.get("text", "")) for p in content)
    return total


def media_refs(data: dict) -> list[MediaRef]:
    """multi_modal_data's items as media refs, images first (a prompt interleaving them goes through chat())."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"multi_modal_data must be a dict like {{'image': [...]}}, got {type(data).__name__}")
    unknown = set(data) - set(MODALITIES)
    if unknown:
        raise InvalidRequestError(f"multi_modal_data keys must be 'image' or 'video', got {sorted(unknown)}")
    refs = []
    for modality in MODALITIES:
        sources = data.get(modality, [])
        if isinstance(sources, (str, bytes, Image.Image)):
            sources = [sources]
        for i, source in enumerate(sources):
            if not isinstance(source, (str, bytes, Image.Image)):
                raise InvalidRequestError(f"multi_modal_data['{modality}'][{i}] must be a URL, a path, bytes or a "
                                          f"PIL image, got {type(source).__name__}")
            refs.append(MediaRef(modality, source, f"multi_modal_data['{modality}'][{i}]"))
    return refs
