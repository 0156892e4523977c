"""Offline API, shaped like vLLM's: `LLM(model=...)`, then `.generate(prompts)` or `.chat(messages)`.

The same three parts as the server, in one process: the input processor validates every prompt before any is
submitted (so a bad prompt leaves nothing half-done), the engine core runs in-process, and the output processor
turns its tokens into text.
"""

import itertools
import weakref
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from vlserve.config import EngineConfig
from vlserve.engine.core import EngineCore
from vlserve.engine.output_processor import OutputProcessor
from vlserve.engine.outputs import RequestOutput
from vlserve.engine.request import EngineRequest
from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import InvalidRequestError
from vlserve.inputs import InputProcessor
from vlserve.media.fetch import MediaPolicy
from vlserve.media.options import MediaOptions
from vlserve.media.template import Rendering, load_tokenizer
from vlserve.model.hub import fetched
from vlserve.plan.preflight import settle


class LLM:
    def __init__(self, model: str, *, mm_processor_kwargs: dict | None = None,
                 allowed_local_media_path: str | None = None, allowed_media_domains: Seq[str] = (),
                 limit_mm_per_prompt: dict[str, int] | None = None, progress: bool = True, **engine_args: Any):
        """`engine_args` are EngineConfig fields (dtype, device, max_model_len, max_num_seqs, block_size, ...)."""
        media = MediaOptions().updated(mm_processor_kwargs)
        policy = MediaPolicy(allowed_local_media_path, tuple(allowed_media_domains))
        if limit_mm_per_prompt is not None:
            engine_args["limit_mm_per_prompt"] = tuple(sorted(limit_mm_per_prompt.items()))
        self.start(EngineConfig(model=str(model), media=media, media_policy=policy, **engine_args), progress)

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> "LLM":
        llm = cls.__new__(cls)
        llm.start(config, progress)
        return llm

    def start(self, config: EngineConfig, progress: bool) -> None:
        config = settle(fetched(config))  # a model name found; knobs left unset, as the plan has them
        self.tokenizer = load_tokenizer(config.tokenizer_dir, config.chat_template)
        self.core = EngineCore(config, progress=progress)
        self.release = weakref.finalize(self, self.core.shutdown)  # on shutdown(), garbage collection or exit
        self.inputs = InputProcessor(config, self.core.model_config, self.tokenizer, self.core.capacity)
        self.outputs = OutputProcessor(self.tokenizer, self.core.eos_token_ids)
        self.ids = itertools.count()

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, a list of token ids, a dict {"prompt" or "prompt_token_ids", "multi_modal_data":
        {"image": [...], "video": [...]}} whose prompt holds one <|image_pad|>/<|video_pad|> per item, or a
        list of these."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = self.params_per_prompt(sampling_params, len(prompts))
        return self.run([self.prompt_request(p, sp) for p, sp in zip(prompts, params)], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, add_generation_prompt=True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """OpenAI-format messages (text, image_url, video_url parts), or a list of conversations."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        params = self.params_per_prompt(sampling_params, len(conversations))
        rendering = Rendering(add_generation_prompt=add_generation_prompt)
        return self.run([self.inputs.chat(self.new_id(), c, p, rendering=rendering)
                         for c, p in zip(conversations, params)], use_tqdm)

    def prompt_request(self, prompt: Any, params: SamplingParams) -> EngineRequest:
        if isinstance(prompt, (str, list)):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise InvalidRequestError(f"a prompt must be a string, a list of token ids or a dict, got "
                                      f"{type(prompt).__name__}")
        text = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if text is None:
            raise InvalidRequestError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids'")
        return self.inputs.prompt(self.new_id(), text, params, prompt.get("multi_modal_data"))

    @staticmethod
    def params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()]
        if len(params) == 1:
            params = params * count
        if len(params) != count:
            raise InvalidRequestError(f"{len(params)} SamplingParams for {count} prompts; pass one or one per prompt")
        return params

    def new_id(self) -> str:
        return f"req-{next(self.ids)}"

    def submit(self, request: EngineRequest) -> None:
        """Queues a request the input processor made; `step` moves it."""
        self.core.add(request)
        self.outputs.add(request)

    def run(self, requests: list[EngineRequest], use_tqdm: bool) -> list[RequestOutput]:
        for req in requests:
            self.submit(req)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(requests), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while self.outputs.has_unfinished():
                for delta in self.step():
                    results.setdefault(delta.request_id, RequestOutput.start(delta)).add(delta)
                    bar.update(delta.finished)
        return [results[req.request_id] for req in requests]

    def step(self) -> list[RequestOutput]:
        """One engine step through the output processor; samples a stop string ended are aborted in the core."""
        processed = self.outputs.process(self.core.step())
        for request_id, index in processed.aborts:
            self.core.abort(request_id, index)
        return processed.outputs

    def shutdown(self) -> None:
        """Stops the engine's workers (tensor/pipeline parallel ranks) and frees its memory (weights, KV cache,
        CUDA graphs) for the next engine; dropping the LLM or leaving `with LLM(...) as llm:` does the same."""
        self.release()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
