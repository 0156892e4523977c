"""Offline API, shaped like vLLM's: `LLM(model=...)`, then `.generate(prompts)` or `.chat(messages)`."""

from collections.abc import Sequence as Seq
from typing import Any

from PIL import Image
from tqdm import tqdm

from vlserve.config import EngineConfig
from vlserve.engine.llm_engine import LLMEngine
from vlserve.engine.outputs import RequestOutput
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import InvalidRequestError
from vlserve.media.fetch import MediaPolicy
from vlserve.media.image import load_image
from vlserve.media.item import MediaItem
from vlserve.media.options import MediaOptions
from vlserve.media.template import build_chat_prompt, expand_media_tokens, load_chat_media
from vlserve.media.video import load_video


class LLM:
    def __init__(self, model: str, *, mm_processor_kwargs: dict | None = None,
                 allowed_local_media_path: str | None = None, allowed_media_domains: Seq[str] = (),
                 limit_mm_per_prompt: dict[str, int] | None = None, progress: bool = True, **engine_args: Any):
        """`engine_args` are EngineConfig fields (dtype, device, max_model_len, max_num_seqs, block_size, ...)."""
        media = MediaOptions().updated(mm_processor_kwargs)
        policy = MediaPolicy(allowed_local_media_path, tuple(allowed_media_domains))
        if limit_mm_per_prompt is not None:
            engine_args["limit_mm_per_prompt"] = tuple(sorted(limit_mm_per_prompt.items()))
        self.engine = LLMEngine(EngineConfig(model=str(model), media=media, media_policy=policy, **engine_args),
                                progress=progress)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, a list of token ids, a dict {"prompt" or "prompt_token_ids", "multi_modal_data":
        {"image": [...], "video": [...]}} whose prompt holds one <|image_pad|>/<|video_pad|> per item, or a
        list of these."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.run([self.prepare(p) for p in prompts], sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, add_generation_prompt=True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """OpenAI-format messages (text, image_url, video_url parts), or a list of conversations."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        cfg, prepared = self.engine.model_config, []
        for conversation in conversations:
            media = load_chat_media(conversation, self.engine.config.media_policy, self.engine.config.media, cfg)
            prompt = build_chat_prompt(self.tokenizer, cfg, conversation, media, add_generation_prompt)
            prepared.append((prompt.token_ids, prompt.media))
        return self.run(prepared, sampling_params, use_tqdm)

    def prepare(self, prompt: Any) -> tuple[list[int], list[MediaItem]]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        elif isinstance(prompt, list):
            prompt = {"prompt_token_ids": prompt}
        if not isinstance(prompt, dict):
            raise InvalidRequestError(f"a prompt must be a string, a list of token ids or a dict, got "
                                      f"{type(prompt).__name__}")
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        elif isinstance(prompt.get("prompt"), str):
            ids = self.tokenizer(prompt["prompt"], add_special_tokens=False)["input_ids"]
        else:
            raise InvalidRequestError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'")
        media = self.load_media(prompt.get("multi_modal_data") or {})
        return expand_media_tokens(ids, media, self.engine.model_config), media

    def load_media(self, data: dict) -> list[MediaItem]:
        """Items in placeholder order: all images, then all videos, unless the prompt interleaves them (then pass
        token ids through chat())."""
        config, items = self.engine.config, []
        for modality, loader in (("image", load_image), ("video", load_video)):
            sources = data.get(modality, [])
            if isinstance(sources, (str, bytes, Image.Image)):
                sources = [sources]
            items += [loader(s, config.media_policy, config.media) for s in sources]
        unknown = set(data) - {"image", "video"}
        if unknown:
            raise InvalidRequestError(f"multi_modal_data keys must be 'image' or 'video', got {sorted(unknown)}")
        return items

    def run(self, prepared: list[tuple[list[int], list[MediaItem]]], sampling_params, use_tqdm: bool):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()]
        if len(params) == 1:
            params = params * len(prepared)
        if len(params) != len(prepared):
            raise InvalidRequestError(f"{len(params)} SamplingParams for {len(prepared)} prompts; pass one or "
                                      "one per prompt")
        ids = []
        try:
            for (tokens, media), p in zip(prepared, params):
                ids.append(self.engine.add_request(tokens, p, media))
        except Exception:
            for request_id in ids:  # all or nothing: a bad prompt leaves no half-submitted batch behind
                self.engine.abort(request_id)
            raise
        return self.drain(ids, use_tqdm)

    def drain(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    results.setdefault(delta.request_id, RequestOutput.start(delta)).add(delta)
                    bar.update(delta.finished)
        return [results[i] for i in ids]
