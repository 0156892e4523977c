"""Where vlserve's time goes, for the workloads of compare_hf.py (Qwen2.5-VL-7B layout, random weights), under
torch.profiler: per workload, wall time against the time the GPU is busy (the gap is host work: scheduling, step
preparation, sampling, kernel launches), then the GPU kernels and the host operations that take the most time.

    python benchmarks/profile_steps.py --device cuda --dtype bfloat16 --output-len 64 --num-requests 64
"""

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_hf import longest_request, make_inputs, parse_args, sync, write_model_folder  # noqa: E402

from vlserve import LLM  # noqa: E402
from vlserve.bench.offline import drive, engine_requests  # noqa: E402


def profile_workload(llm, name: str, workload, prompts: list, device: torch.device, rows: int,
                     trace_dir: str | None = None) -> None:
    drive(llm, engine_requests(llm, prompts[:1], replace(workload, output_len=min(workload.output_len, 8))
                               .sampling_params()))
    measured = engine_requests(llm, prompts[1:], workload.sampling_params())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        drive(llm, measured)
        sync(device)
        wall = time.perf_counter() - start
    if trace_dir:  # the timeline, for chrome://tracing or Perfetto: gaps between steps show host time
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace_dir) / f"{name}.json"))
    events = prof.key_averages()
    # Kernels only: an operator's device time is its kernels' again
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
    print(f"\n== {name}: {len(measured)} request(s), wall {wall * 1e3:.1f} ms, GPU busy {busy * 1e3:.1f} ms "
          f"({busy / wall:.0%} of the wall time)")
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    args = parse_args(argv, extra=lambda p: p.add_argument(
        "--trace-dir", help="write each workload's timeline here (Chrome trace JSON)"))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="profile-steps-") as tmp:
        folder = write_model_folder(args.layout, Path(tmp))
        inputs = make_inputs(args, folder)
        llm = LLM(str(folder), load_format="dummy", dtype=args.dtype, device=args.device,
                  max_model_len=longest_request(inputs),
                  gpu_memory_utilization=args.gpu_memory_utilization, progress=False, kv_cache_memory_gib=0.05,
                  async_scheduling=args.async_scheduling)
        print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {args.dtype}, "
              f"layout {args.layout}, torch {torch.__version__}, async scheduling {args.async_scheduling}")
        for name, (workload, prompts, _) in inputs.items():
            count = args.num_requests if name == "throughput" else 1
            trace_dir = args.trace_dir if name == "decode1" else None  # the throughput one is too large to keep
            profile_workload(llm, name, workload, prompts[:1 + count], device, rows=12, trace_dir=trace_dir)
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
