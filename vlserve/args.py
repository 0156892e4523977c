"""Engine flags, named as vLLM's, shared by `serve`, `bench` and `plan`; they become one EngineConfig."""

import argparse
import json
import logging
import os

from vlserve.config import EXECUTOR_BACKENDS, LOAD_FORMATS, TUNABLE, VISION_TP_MODES, EngineConfig
from vlserve.errors import ConfigError, MediaError
from vlserve.media.fetch import MediaPolicy
from vlserve.media.options import MediaOptions
from vlserve.media.templates import TOOLS_TEMPLATE

log = logging.getLogger("vlserve")


def api_key_from_env() -> str | None:
    """The server's key when --api-key is not given: VLSERVE_API_KEY, else vLLM's VLLM_API_KEY."""
    return os.environ.get("VLSERVE_API_KEY") or os.environ.get("VLLM_API_KEY")


FITS = "; unset, vlserve lowers it if the model would not fit otherwise, as `vlserve plan` shows"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The knobs of config.TUNABLE default to None here: unset, engine_config makes them tunable."""
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto | float16 | bfloat16 | float32 (auto: bf16 on compute "
                   "capability >= 8.0, fp16 below, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                   help="auto: read the checkpoint's safetensors; dummy: random weights made on the device, only "
                   "config.json and the tokenizer files read (benchmarks)")
    g.add_argument("--max-model-len", type=int, help="prompt + output tokens per sequence (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, help=f"sequences per step (default {EngineConfig.max_num_seqs}{FITS})")
    g.add_argument("--max-num-batched-tokens", type=int, help=f"tokens per step (default 8192{FITS})")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="split long prompts over steps of --max-num-batched-tokens")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (a multiple of 16)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of a prompt prefix seen before")
    g.add_argument("--kv-cache-memory-gib", type=float,
                   help="CPU: memory for the KV cache (default: what --max-num-seqs sequences of --max-model-len "
                        "tokens need, at most what the memory free after the weights allows)")
    g.add_argument("--gpu-memory-utilization", type=float, help="GPU: fraction of the card's memory vlserve may "
                   f"use (default {EngineConfig.gpu_memory_utilization}; unset, vlserve may raise it to 0.95 if the "
                   "model would not fit otherwise, as `vlserve plan` shows)")
    g.add_argument("--num-gpu-blocks-override", type=int, help="KV blocks to allocate, skipping memory profiling")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: run every decode step eagerly (saves capture time and a little memory)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="prepare and launch each step while the last one runs on the device, its tokens read a step "
                   "late (one rank; tensor and pipeline parallel steps wait for the last one)")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="ranks that split each layer")
    g.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1, help="stages that split the layers")
    g.add_argument("--pp-layer-partition", metavar="N,N,...", help="layers per pipeline stage, e.g. 10,10,8 "
                   "(default: an even split, the first stages taking one more)")
    g.add_argument("--distributed-executor-backend", choices=EXECUTOR_BACKENDS,
                   help="local: one process; mp: one spawned process per rank on this machine; ray: Ray actors "
                   "across the machines of a `vlserve cluster` (default: local for one rank, ray when the ranks "
                   "outnumber this machine's GPUs, else mp)")
    g.add_argument("--mm-encoder-tp-mode", choices=VISION_TP_MODES,
                   help="vision tower under tensor parallel: data (whole on every rank, images spread over ranks) "
                   f"or weights (its heads and MLP split over the ranks) (default {EngineConfig.mm_encoder_tp_mode}; "
                   "unset, vlserve takes the one that leaves the larger KV cache, as `vlserve plan` shows)")
    g.add_argument("--vision-cache-mib", type=int, default=512, help="encoded images kept for reuse across turns")
    g.add_argument("--max-num-encoder-tokens", type=int,
                   help="media tokens whose images and videos one step may encode (the encoder budget: prefill "
                   "chunks stop before the item that would pass it, so decodes keep their pace while large images "
                   "arrive; default: the largest image's tokens, what memory profiling encodes)")
    g.add_argument("--limit-mm-per-prompt", default=None, help='JSON, e.g. \'{"image": 4, "video": 1}\'')
    g.add_argument("--mm-processor-kwargs", default=None,
                   help='JSON preprocessing defaults, e.g. \'{"max_pixels": 1003520, "fps": 1}\' (max_pixels '
                   f'unset: {MediaOptions.max_pixels}{FITS})')
    g.add_argument("--allowed-local-media-path", default=None, help="folder whose files requests may name")
    g.add_argument("--allowed-media-domains", nargs="*", default=[], help="hosts media URLs may come from")
    g.add_argument("--tokenizer", help="a folder holding the tokenizer (default: the checkpoint's)")
    g.add_argument("--chat-template", help="a .jinja file (or the template's text) in place of the checkpoint's "
                   f"chat template; for tool calling with Qwen2.5-VL: {TOOLS_TEMPLATE}")
    g.add_argument("--download-dir", help="the Hugging Face cache a model name is found (or downloaded) in "
                   "(default: HF_HOME's)")
    g.add_argument("--quantization", "-q", help="the checkpoint's quantization method (awq, gptq, ...): checked "
                   "against its config.json; vlserve reads it from there either way")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM command lines; vlserve never runs code from a checkpoint")


def json_flag(flag: str, value: str | None) -> dict:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"image\": 4}}': {e}") from e
    if not isinstance(parsed, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {value!r}")
    return parsed


def int_list(flag: str, value: str | None, what: str, example: str) -> tuple[int, ...] | None:
    """A comma-separated list of integers from a flag (None when the flag is not given)."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {value!r} must be comma-separated {what}, e.g. {example}") from None


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    if args.trust_remote_code:
        log.info("--trust-remote-code: vlserve runs no code from checkpoints (its model code is its own); the flag "
                 "changes nothing")
    limits = json_flag("--limit-mm-per-prompt", args.limit_mm_per_prompt)
    for key, count in limits.items():
        if key not in ("image", "video") or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"--limit-mm-per-prompt: {key!r}: {count!r}; keys are image and video, values "
                              "non-negative integers")
    defaults = dict(EngineConfig.limit_mm_per_prompt)
    media_kwargs = json_flag("--mm-processor-kwargs", args.mm_processor_kwargs)
    try:
        media = MediaOptions().updated(media_kwargs)
    except MediaError as e:
        raise ConfigError(f"--mm-processor-kwargs: {e}") from e
    given = {knob: getattr(args, knob) for knob in TUNABLE - {"max_pixels"} if getattr(args, knob) is not None}
    unset = TUNABLE - set(given) - set(media_kwargs)  # max_pixels is set in --mm-processor-kwargs
    return EngineConfig(
        model=model, dtype=args.dtype, device=args.device, seed=args.seed, max_model_len=args.max_model_len,
        enable_chunked_prefill=args.enable_chunked_prefill, block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, kv_cache_memory_gib=args.kv_cache_memory_gib,
        num_gpu_blocks_override=args.num_gpu_blocks_override, vision_cache_mib=args.vision_cache_mib,
        max_num_encoder_tokens=args.max_num_encoder_tokens,
        distributed_executor_backend=args.distributed_executor_backend, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        pp_layer_partition=int_list("--pp-layer-partition", args.pp_layer_partition, "layer counts", "10,10,8"),
        limit_mm_per_prompt=tuple(sorted({**defaults, **limits}.items())), media=media,
        media_policy=MediaPolicy(args.allowed_local_media_path, tuple(args.allowed_media_domains)),
        load_format=args.load_format, tokenizer=args.tokenizer, chat_template=args.chat_template,
        download_dir=args.download_dir, quantization=args.quantization, tunable=unset, **given,
    )
