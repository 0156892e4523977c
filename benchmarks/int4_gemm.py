"""The Triton 4-bit matmul (vlserve/kernels/int4_matmul_triton.py) against bf16 F.linear on Qwen2.5-VL-7B's
language-model layers, on one GPU.

For each layer shape (K, N) and batch M: the kernel's output is checked once against the dense path (x @ W with W
dequantized in torch) and its relative error printed; then bf16 F.linear, AWQ and GPTQ are each timed as CUDA-graph
replays of back-to-back calls (launch gaps as in a captured decode step), each call on another copy of the weights
so that the copies together overflow L2 as a model's layers do; the median over --reps replays, divided by the
calls. Printed: microseconds per call, bf16 time / kernel time, and GB/s of weight bytes read (bf16: 2 bytes a
weight; 4-bit: half a byte plus scales and zero points).

    python benchmarks/int4_gemm.py [--m 1 2 4 ...] [--group 128] [--json results/int4_gemm.json]

Needs a CUDA GPU and Triton."""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlserve.model.layers import awq, gptq  # noqa: E402

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}  # (K, N)
BATCHES = (1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192)
WORKING_SET = 256 << 20  # bytes of weight copies cycled through per variant: several times an H100's 50 MB of L2


def quantized(weight: torch.Tensor, method: str, group: int) -> dict:
    """The int4 tensors of a (N, K) weight, and the dense (K, N) weight they stand for (fp32)."""
    if method == "awq":
        qweight, qzeros, scales = awq.quantize(weight, group)
        dense = awq.dequantize(qweight, qzeros, scales.float())
        return dict(qweight=qweight, qzeros=qzeros, scales=scales, zero_offset=0, dense=dense)
    qweight, qzeros, scales, _ = gptq.quantize(weight, group, zero_offset=1)
    dense = gptq.dequantize(qweight, qzeros, scales.float(), 1)
    return dict(qweight=qweight, qzeros=qzeros, scales=scales, zero_offset=1, dense=dense)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def graph_time(calls, reps: int) -> float:
    """Seconds per call: `calls` (a list of thunks) captured in one CUDA graph, the median of `reps` replays."""
    for call in calls[:2]:
        call()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def copies_for(size: int) -> int:
    return max(2, -(-WORKING_SET // size))


def bench_shape(name: str, k: int, n: int, args, int4_linear, pick_config) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    weight = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    layers = {m: quantized(weight, m, args.group) for m in args.methods}
    dense_bf16 = weight.to(torch.bfloat16)
    del weight
    int4_bytes = {m: nbytes(q["qweight"], q["qzeros"], q["scales"]) for m, q in layers.items()}
    for method, q in layers.items():  # once per shape: the kernel against the dense path
        for m in (1, 256):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ q["dense"]
            got = int4_linear(x, q["qweight"], q["qzeros"], q["scales"], None, method, args.group, q["zero_offset"])
            err = ((got.float() - ref).norm() / ref.norm()).item()
            print(f"check {name} {method} M={m}: relative error {err:.2e}")
        q["dense"] = None
    bf16_copies = [dense_bf16] + [dense_bf16.clone() for _ in range(copies_for(nbytes(dense_bf16)) - 1)]
    int4_copies = {m: [q] + [{**q, **{t: q[t].clone() for t in ("qweight", "qzeros", "scales")}}
                             for _ in range(copies_for(int4_bytes[m]) - 1)] for m, q in layers.items()}
    rows = []
    for m in args.m:
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        calls_per_graph = max(len(bf16_copies), 4) if m <= 256 else 2
        base = graph_time([lambda w=bf16_copies[i % len(bf16_copies)]: F.linear(x, w)
                           for i in range(calls_per_graph)], args.reps)
        row = dict(layer=name, K=k, N=n, M=m, bf16_us=base * 1e6, bf16_GBps=nbytes(dense_bf16) / base / 1e9)
        for method, copies in int4_copies.items():
            calls_per_graph = max(len(copies), 4) if m <= 256 else 2
            t = graph_time([lambda q=copies[i % len(copies)], method=method: int4_linear(
                x, q["qweight"], q["qzeros"], q["scales"], None, method, args.group, q["zero_offset"])
                for i in range(calls_per_graph)], args.reps)
            row.update({f"{method}_us": t * 1e6, f"{method}_speedup": base / t,
                        f"{method}_GBps": int4_bytes[method] / t / 1e9,
                        f"{method}_config": str(pick_config(m, n, k, args.group, method, x.device))})
        rows.append(row)
        print(" ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in row.items() if not key.endswith("config")), flush=True)
    return rows


def table(rows: list[dict], methods: list[str]) -> str:
    head = f"{'layer':8} {'K':>6} {'N':>6} {'M':>5} {'bf16 us':>9} {'GB/s':>6}"
    for method in methods:
        head += f" {method + ' us':>9} {'x bf16':>7} {'GB/s':>6}"
    lines = [head]
    for r in rows:
        line = f"{r['layer']:8} {r['K']:>6} {r['N']:>6} {r['M']:>5} {r['bf16_us']:>9.1f} {r['bf16_GBps']:>6.0f}"
        for method in methods:
            line += f" {r[method + '_us']:>9.1f} {r[method + '_speedup']:>7.2f} {r[method + '_GBps']:>6.0f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", choices=SHAPES, default=list(SHAPES), help="layer shapes to run")
    p.add_argument("--m", nargs="+", type=int, default=list(BATCHES), help="batch sizes (rows of x)")
    p.add_argument("--group", type=int, default=128, help="quantization group size")
    p.add_argument("--methods", nargs="+", choices=("awq", "gptq"), default=["awq", "gptq"])
    p.add_argument("--reps", type=int, default=10, help="graph replays per timing (the median is kept)")
    p.add_argument("--json", type=Path, help="write the rows and the device here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    from vlserve.kernels.int4_matmul_triton import int4_linear, pick_config
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in args.layers:
        rows += bench_shape(name, *SHAPES[name], args, int4_linear, pick_config)
        torch.cuda.empty_cache()
    print(table(rows, args.methods))
    if args.json:
        import triton
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "triton": triton.__version__, "group": args.group, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
