"""vlserve beside transformers on the same workloads, the same token ids and the same preprocessed image, in one run.

Both sides build the Qwen2.5-VL layout (7B by default; --layout qwen3-vl-8b for Qwen3-VL-8B's) with random weights on
the device; nothing is downloaded.
Order: the memory bandwidth (for the batch-1 decode roofline), transformers' runs (its model freed after), then
vlserve's with the whole card. Every figure follows a warm-up; greedy decoding, fixed lengths on both sides.
  decode1     one 512-token prompt, 256 out: decode tok/s after the first token, (out - 1) / (last - first token);
              for transformers (out - 1) / (time of generate(out tokens) - time of generate(1 token))
  throughput  --num-requests prompts for vlserve, one batch of --hf-batch for transformers: output tok/s
  ttft        one 1280x720 image + 32 text tokens: ms to the first token, median of --repeats, preprocessing excluded
  prefill8k   8,192 prompt tokens, one output token: prompt tok/s
Run (H100): python benchmarks/compare_hf.py --layout 7b --device cuda --json compare_hf.json
"""

import argparse
import datetime
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from vlserve import LLM
from vlserve.bench.offline import drive, engine_requests
from vlserve.bench.prompts import Workload, engine_request, make_prompts, parse_image_size
from vlserve.config import EngineConfig, ModelConfig
from vlserve.engine.sampling_params import SamplingParams
from vlserve.inputs import InputProcessor
from vlserve.model.tiny import TinySpec, tiny_config, write_model_files
from vlserve.plan.layouts import layout_config, qwen3_vl_config
from vlserve.plan.memory import Weights

WORKLOADS = ("decode1", "throughput", "ttft", "prefill8k")
UNITS = {"decode1": "tok/s", "throughput": "out tok/s", "ttft": "ms", "prefill8k": "tok/s"}
TARGETS_7B = {"decode1": 180, "throughput": 10_000, "ttft": 45, "prefill8k": 40_000}  # H100, docs/design
PAD_TOKEN_ID = 151643  # <|endoftext|>


def parse_args(argv, extra=None):
    """compare_hf's options; `extra(parser)` adds a script's own (profile_steps.py)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=tuple(LAYOUTS), default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--num-requests", type=int, default=256, help="vlserve's throughput requests")
    p.add_argument("--hf-batch", type=int, default=128, help="transformers' throughput: one batch of this many")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prefill-len", type=int, default=8192)
    p.add_argument("--image-size", default="1280x720")
    p.add_argument("--image-text-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="measured TTFT requests (after one warm-up)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vlserve's, after transformers is freed")
    p.add_argument("--skip-transformers", action="store_true",
                   help="vlserve alone (a baseline tree of vlserve run in the same call beside another's full run)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="vlserve's --async-scheduling (off: the step-by-step engine, for an A/B in one tree)")
    p.add_argument("--json", help="write the results here")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads {','.join(args.workloads)}: choose from {','.join(WORKLOADS)}")
    return args


# --layout -> config.json
LAYOUTS = {"7b": lambda: layout_config("7B"), "qwen3-vl-8b": lambda: qwen3_vl_config("8B"),
           "tiny": lambda: tiny_config(TinySpec()), "qwen3-vl-tiny": lambda: tiny_config(TinySpec(family="qwen3-vl"))}


def write_model_folder(layout: str, out: Path) -> Path:
    """config.json, tokenizer, chat template and generation config: all --load-format dummy reads."""
    write_model_files(out, LAYOUTS[layout]())
    return out


def make_inputs(args, folder: Path) -> dict:
    """workload -> (Workload, prompts, [(token ids, media)] as the input processor makes them, for transformers).
    The first prompt is vlserve's warm-up (distinct from the measured ones: the prefix cache keeps it);
    transformers warms up on what it measures."""
    processor = InputProcessor.for_model(EngineConfig(model=str(folder)))
    text = {"input_len": args.input_len, "output_len": args.output_len, "temperature": 0.0}
    workloads = {"decode1": Workload(num_prompts=2, seed=1, **text),
                 "throughput": Workload(num_prompts=1 + max(args.num_requests, args.hf_batch), seed=2, **text),
                 "ttft": Workload(num_prompts=1 + args.repeats, input_len=args.image_text_len, output_len=1,
                                  image_size=parse_image_size(args.image_size), temperature=0.0, seed=3),
                 "prefill8k": Workload(num_prompts=2, input_len=args.prefill_len, output_len=1, seed=4)}
    inputs = {}
    for name, w in workloads.items():
        if name in args.workloads:
            prompts = make_prompts(w, processor.tokenizer)
            reqs = [engine_request(processor, p, SamplingParams(max_tokens=w.output_len), f"hf-{i}")
                    for i, p in enumerate(prompts)]
            inputs[name] = (w, prompts, [(r.prompt_token_ids, [span.item for span in r.media]) for r in reqs])
    return inputs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bandwidth_gbs(device: torch.device) -> tuple[float, str]:
    """A large copy: each byte read once and written once, so GB/s = 2 * bytes / time."""
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page faults, kernel load
    iters = 10
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        seconds, label = begin.elapsed_time(end) / 1000, "device-to-device copy (CUDA events)"
    else:
        seconds, label = timed(lambda: [dst.copy_(src) for _ in range(iters)], device), "host memcpy (CPU run)"
    return 2 * nbytes * iters / seconds / 1e9, label


def decode_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, context: int) -> int:
    """What one batch-1 decode step reads: the language model's weights (one embedding row aside, the vision tower
    idle) and the KV cache of `context` tokens."""
    layers, parts = Weights(cfg).parts(1, False, dtype.itemsize)
    weights = sum(layers) + parts["model.norm."] + parts["lm_head."]
    weights += parts["model.embed_tokens."] if cfg.tie_word_embeddings else 0  # the tied LM head reads it whole
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize * context
    return weights + kv


# ---- transformers ----
def hf_kwargs(ids: list[list[int]], media, cfg: ModelConfig, device: torch.device) -> dict:
    """generate()'s inputs from the engine's: equal-length rows, so no padding; images as tests/hf_reference.py."""
    input_ids = torch.tensor(ids, device=device)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "mm_token_type_ids": (input_ids == cfg.image_token_id).int()}
    if media:
        kwargs["pixel_values"] = torch.cat([m.pixel_values for m in media]).to(device)
        kwargs["image_grid_thw"] = torch.tensor([m.grid_thw for m in media], device=device)
    return kwargs


def hf_generate(model, kwargs: dict, n: int) -> float:
    return timed(lambda: model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=PAD_TOKEN_ID), model.device)


def run_hf(args, folder: Path, inputs: dict, dtype: torch.dtype, device: torch.device) -> dict:
    cfg = ModelConfig.from_dir(folder)
    with torch.device(device):
        model_class = getattr(transformers, cfg.architecture)
        model = model_class._from_config(transformers.AutoConfig.from_pretrained(folder), dtype=dtype).eval()
    results = {}
    with torch.inference_mode():
        for name, (w, _, reqs) in inputs.items():
            if name == "throughput":
                runs = [hf_kwargs([ids for ids, _ in reqs[1:1 + args.hf_batch]], [], cfg, device)]
            else:
                runs = [hf_kwargs([ids], media, cfg, device) for ids, media in reqs[1:]]
            hf_generate(model, runs[0], 2)  # warm-up
            if name == "decode1":
                first, whole = hf_generate(model, runs[0], 1), hf_generate(model, runs[0], w.output_len)
                results[name] = (w.output_len - 1) / (whole - first)
            elif name == "throughput":
                results[name] = args.hf_batch * w.output_len / hf_generate(model, runs[0], w.output_len)
            elif name == "ttft":
                results[name] = 1000 * statistics.median(hf_generate(model, run, 1) for run in runs)
            else:
                results[name] = runs[0]["input_ids"].shape[1] / hf_generate(model, runs[0], 1)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# ---- vlserve ----
def run_vlserve(args, folder: Path, inputs: dict) -> dict:
    llm = LLM(str(folder), load_format="dummy", dtype=args.dtype, device=args.device,
              max_model_len=longest_request(inputs), gpu_memory_utilization=args.gpu_memory_utilization,
              progress=False, kv_cache_memory_gib=0.05,  # the CPU smoke run's KV cache; a GPU sizes it by memory
              async_scheduling=args.async_scheduling)
    results = {}
    for name, (w, prompts, _) in inputs.items():
        params = w.sampling_params()
        warm_up = replace(w, output_len=min(w.output_len, 8)).sampling_params()
        drive(llm, engine_requests(llm, prompts[:1], warm_up))
        if name == "decode1":
            (t,), _ = drive(llm, engine_requests(llm, prompts[1:2], params))
            results[name] = (t.output_tokens - 1) / (t.latency - t.ttft)
        elif name == "throughput":
            timings, elapsed = drive(llm, engine_requests(llm, prompts[1:1 + args.num_requests], params))
            results[name] = sum(t.output_tokens for t in timings) / elapsed
        elif name == "ttft":  # one at a time, so none waits behind another
            results[name] = 1000 * statistics.median(drive(llm, engine_requests(llm, [p], params))[0][0].ttft
                                                     for p in prompts[1:])
        else:
            (t,), _ = drive(llm, engine_requests(llm, prompts[1:2], params))
            results[name] = t.prompt_tokens / t.latency
    llm.shutdown()
    return results


def longest_request(inputs: dict) -> int:
    """Prompt plus output tokens of the longest request of any workload: vlserve's --max-model-len."""
    return max(len(ids) + w.output_len for w, _, reqs in inputs.values() for ids, _ in reqs)


def table(args, ours: dict, theirs: dict, roofline: float) -> list[dict]:
    rows = []
    for name in args.workloads:
        lower_better = name == "ttft"
        speedup = None
        if name in theirs:
            speedup = theirs[name] / ours[name] if lower_better else ours[name] / theirs[name]
        target = TARGETS_7B[name] if args.layout == "7b" else None
        met = None if target is None else (ours[name] <= target if lower_better else ours[name] >= target)
        fraction = None  # the roofline is batch-1 decode's
        if name == "decode1":
            fraction = {"vlserve": ours[name] / roofline}
            if name in theirs:
                fraction["transformers"] = theirs[name] / roofline
        rows.append({"workload": name, "unit": UNITS[name], "vlserve": ours[name], "transformers": theirs.get(name),
                     "speedup": speedup, "target": target, "met": met, "roofline_fraction": fraction})
    return rows


def print_table(rows: list[dict], context: dict) -> None:
    for key, value in context.items():
        print(f"{key + ':':<22}{value}")
    print(f"{'workload':<11} {'unit':<10} {'vlserve':>10} {'transformers':>13} {'speedup':>8} {'target':>8} "
          f"{'met?':>5}  roofline (vlserve / transformers)")
    for r in rows:
        f, met = r["roofline_fraction"], {None: "-", True: "yes", False: "NO"}[r["met"]]
        roofline = "-" if f is None else " / ".join(f"{v:.1%}" for v in f.values())
        theirs = "-" if r["transformers"] is None else f"{r['transformers']:.1f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['workload']:<11} {r['unit']:<10} {r['vlserve']:>10.1f} {theirs:>13} "
              f"{speedup:>8} {r['target'] or '-':>8} {met:>5}  {roofline}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="compare-hf-") as tmp:
        folder = write_model_folder(args.layout, Path(tmp))
        cfg, inputs = ModelConfig.from_dir(folder), make_inputs(args, folder)
        gbs, how = bandwidth_gbs(device)
        context_tokens = args.input_len + args.output_len // 2  # the mean context over a decode1 request
        roofline = gbs * 1e9 / decode_bytes_per_token(cfg, dtype, context_tokens)
        theirs = {} if args.skip_transformers else run_hf(args, folder, inputs, dtype, device)
        print("transformers:", {name: round(value, 2) for name, value in theirs.items()}, flush=True)
        ours = run_vlserve(args, folder, inputs)
    rows = table(args, ours, theirs, roofline)
    context = {
        "Device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "Date": datetime.date.today().isoformat(), "Layout": f"{cfg.architecture} {args.layout}, random weights",
        "Dtype": args.dtype, "torch / transformers": f"{torch.__version__} / {transformers.__version__}",
        "Bandwidth": f"{gbs:.0f} GB/s ({how})",
        "Decode roofline": f"{roofline:.1f} tok/s at batch 1 (weights + KV of {context_tokens} tokens per token)",
        "Throughput": f"vlserve {args.num_requests} requests, transformers one batch of {args.hf_batch}",
        "Lengths": f"{args.input_len} in / {args.output_len} out; prefill {args.prefill_len}; TTFT "
                   f"{args.image_size} image + {args.image_text_len} text tokens, median of {args.repeats}",
    }
    print_table(rows, context)
    if args.json:
        Path(args.json).write_text(json.dumps({**context, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
