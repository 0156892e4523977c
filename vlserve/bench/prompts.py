"""Benchmark workloads: synthetic prompts as token ids + media for the engine, or OpenAI chat messages for a
server, and the output length and sampling every request asks for.

The text is made of word tokens (a space and lowercase ASCII letters, e.g. " apple"). Qwen's pre-tokenizer cuts
text before each such word and each is one vocabulary entry, so the decoded text tokenizes back to exactly the
same ids: a benchmark that sends text over HTTP gets the prompt lengths the engine benchmark gets from ids.

A prompt without images is its raw text ids, exactly --input-len tokens (as vLLM's random dataset). A prompt with
images is one chat user turn (the images must sit inside the template's vision markers): the template's tokens and
the images' come on top of --input-len.
"""

import base64
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlserve.engine.sampling_params import SamplingParams
from vlserve.errors import ConfigError

DATASETS = ("random", "fixed")
WORD_TOKEN = re.compile(r"Ġ[a-z]+")  # byte-level BPE spells the leading space as Ġ; no special or media token
FIXED_TEXT = " the quick brown fox jumps over the lazy dog"  # one token per word


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 100
    input_len: int = 512  # text tokens per prompt
    dataset: str = "random"  # random: fresh words per prompt; fixed: one text for all (prefix cache hits)
    image_size: tuple[int, int] | None = None  # (width, height); None: text-only prompts
    images_per_prompt: int | None = None  # None: 1 when image_size is set
    same_image: bool = False  # every prompt gets the same images (vision and prefix cache hits)
    output_len: int = 128
    ignore_eos: bool = True  # so every request generates exactly output_len tokens
    temperature: float = 1.0  # as vLLM's benchmarks: the sampler's full path, as most traffic takes it
    seed: int = 0

    def __post_init__(self):
        for flag, value in (("--num-prompts", self.num_prompts), ("--input-len", self.input_len),
                            ("--output-len", self.output_len)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset!r} must be one of {', '.join(DATASETS)}")
        if self.image_size is None and (self.images_per_prompt is not None or self.same_image):
            raise ConfigError("--images-per-prompt and --same-image need --image-size WxH")
        if self.images_per_prompt is not None and self.images_per_prompt < 1:
            raise ConfigError(f"--images-per-prompt must be at least 1, got {self.images_per_prompt}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0 (it seeds numpy's generator), got {self.seed}")

    @property
    def num_images(self) -> int:
        return 0 if self.image_size is None else self.images_per_prompt or 1

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_tokens=self.output_len, ignore_eos=self.ignore_eos)


def pil_image_part(image: Image.Image) -> dict:
    return {"type": "image", "image": image}


def openai_image_part(image: Image.Image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


@dataclass
class BenchPrompt:
    text_ids: list[int]  # the text part: input_len tokens
    text: str  # tokenizes back to text_ids
    images: list[Image.Image]

    def messages(self, image_part: Callable[[Image.Image], dict] = pil_image_part) -> list[dict]:
        """One user turn, images first: PIL image parts for the input processor, or pass openai_image_part."""
        return [{"role": "user", "content": [*map(image_part, self.images), {"type": "text", "text": self.text}]}]


def parse_image_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)[xX](\d+)", value.strip())
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ConfigError(f"--image-size {value!r} must be WIDTHxHEIGHT in pixels, e.g. 1280x720")
    return int(match[1]), int(match[2])


def make_prompts(w: Workload, tokenizer) -> list[BenchPrompt]:
    return [BenchPrompt(ids, tokenizer.decode(ids), [make_image(w, 0 if w.same_image else i, k)
                                                     for k in range(w.num_images)])
            for i, ids in enumerate(text_ids(w, tokenizer))]


def text_ids(w: Workload, tokenizer) -> list[list[int]]:
    if w.dataset == "fixed":
        base = tokenizer(FIXED_TEXT, add_special_tokens=False)["input_ids"]
        return [(base * -(-w.input_len // len(base)))[:w.input_len] for _ in range(w.num_prompts)]
    words = np.array(sorted(i for token, i in tokenizer.get_vocab().items() if WORD_TOKEN.fullmatch(token)))
    rng = np.random.default_rng(w.seed)
    return [rng.choice(words, w.input_len).tolist() for _ in range(w.num_prompts)]


def make_image(w: Workload, prompt_index: int, k: int) -> Image.Image:
    """A colour gradient with random slopes: distinct per (prompt, image), so no accidental cache hit, and smooth,
    so it stays small as PNG. The vision tower's cost does not depend on the pixels."""
    width, height = w.image_size
    rng = np.random.default_rng([w.seed, prompt_index, k])
    y, x = np.mgrid[0:height, 0:width]
    base, dx, dy = rng.uniform(0, 255, 3), rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    pixels = (base + x[..., None] * dx + y[..., None] * dy) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def engine_request(processor, prompt: BenchPrompt, params: SamplingParams, request_id: str):
    """The prompt through the input processor: raw text ids alone, or one chat turn with its images."""
    if not prompt.images:
        return processor.prompt(request_id, list(prompt.text_ids), params)
    return processor.chat(request_id, prompt.messages(), params)
