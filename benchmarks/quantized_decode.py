"""4-bit against 16-bit decoding in one run: the Qwen2.5-VL-7B layout with random weights, served by vlserve as a
dense checkpoint and as AWQ and GPTQ checkpoints (group 128, the public -AWQ / -GPTQ-Int4 format; --load-format
dummy: random packed weights and scales, nothing written or read), on the same prompts.

  decode1     one 512-token prompt, 256 out: decode tok/s after the first token (batch 1: the bandwidth case)
  throughput  --num-requests prompts of 512 in / 256 out: output tok/s

Prints each format's figures, its ratio to the dense run and its share of the batch-1 roofline (bytes per token:
the format's weights plus the KV cache). The issue's target: AWQ decode1 >= 2.2x the dense model's.
Run (H100): python benchmarks/quantized_decode.py --json quantized_decode.json
"""

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_hf import bandwidth_gbs, decode_bytes_per_token, make_inputs, parse_args, run_vlserve  # noqa: E402
from vlserve.config import ModelConfig  # noqa: E402
from vlserve.model.tiny import TinySpec, tiny_config, write_model_files  # noqa: E402
from vlserve.plan.layouts import layout_config  # noqa: E402

FORMATS = ("dense", "awq", "gptq")
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}


def model_config(layout: str, fmt: str) -> dict:
    """config.json of the 7B layout (or the tiny one, for a CPU smoke run) in format `fmt`."""
    if layout == "tiny":
        spec = TinySpec(awq_group=32 if fmt == "awq" else 0, gptq_group=32 if fmt == "gptq" else 0)
        return tiny_config(spec)
    raw = layout_config("7B", awq=fmt == "awq")
    if fmt == "gptq":
        raw["quantization_config"] = dict(GPTQ)
    return raw


def extra_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))


def main(argv=None) -> int:
    args = parse_args(argv, extra_args)
    args.skip_transformers, args.workloads = True, [w for w in args.workloads if w in ("decode1", "throughput")]
    formats = [f for f in args.formats.split(",") if f]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gbs, how = bandwidth_gbs(device)
    context_tokens = args.input_len + args.output_len // 2
    results = {}
    with tempfile.TemporaryDirectory(prefix="quantized-decode-") as tmp:
        for fmt in formats:
            folder = Path(tmp) / fmt
            folder.mkdir()
            write_model_files(folder, model_config(args.layout, fmt))
            cfg = ModelConfig.from_dir(folder)
            roofline = gbs * 1e9 / decode_bytes_per_token(cfg, dtype, context_tokens)
            ours = run_vlserve(args, folder, make_inputs(args, folder))
            results[fmt] = {**ours, "roofline_tok_s": roofline}
            print(fmt, {k: round(v, 1) for k, v in results[fmt].items()}, flush=True)
    base = results.get("dense")
    rows = []
    for fmt, figures in results.items():
        for name in args.workloads:
            ratio = figures[name] / base[name] if base else None
            share = figures[name] / figures["roofline_tok_s"] if name == "decode1" else None
            rows.append({"format": fmt, "workload": name, "value": figures[name], "vs_dense": ratio,
                         "roofline_share": share})
    context = {"Device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "Date": datetime.date.today().isoformat(), "Layout": f"Qwen2.5-VL-{args.layout}, random weights",
               "Dtype": args.dtype, "torch": torch.__version__, "Bandwidth": f"{gbs:.0f} GB/s ({how})",
               "Lengths": f"{args.input_len} in / {args.output_len} out; throughput {args.num_requests} requests"}
    for key, value in context.items():
        print(f"{key + ':':<12}{value}")
    print(f"{'format':<7} {'workload':<11} {'value':>10} {'vs dense':>9} {'roofline':>9}")
    for r in rows:
        ratio = "-" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}x"
        share = "-" if r["roofline_share"] is None else f"{r['roofline_share']:.1%}"
        print(f"{r['format']:<7} {r['workload']:<11} {r['value']:>10.1f} {ratio:>9} {share:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({**context, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
