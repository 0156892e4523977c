"""Host time per decode step: what the engine does on the CPU around the model at N running sequences.

On a GPU every millisecond here is a millisecond the card waits (the 256-request run of compare_hf.py kept an H100
busy 44% of the time). This times each phase of a step (`LLM.step`: the engine core's step, then the output
processor) with the model's own work split off: scheduling, building the step's inputs, sampling, completing the
step (reading its tokens, stop checks, core outputs) and output processing (detokenization, stop strings, deltas). The
model's forward and logits run on the chosen device and are reported apart; on the CPU, sampling is device work
too (it runs on the logits' device), so its figure is shown but not counted as host time.

    python benchmarks/host_overhead.py [--seqs 256] [--prompt-len 512] [--steps 40] [--sampling greedy|qwen|top-p]

Needs only a checkpoint folder (default: a tiny random one made with `vlserve make-tiny`); the host side does not
depend on the model's size, only on the number of sequences, their lengths and the vocabulary (Qwen2.5's here).
"""

import argparse
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from vlserve import LLM, SamplingParams
from vlserve.model.tiny import TinySpec, make_tiny

HOST_PHASES = ("schedule", "prepare", "complete", "output processing")
SAMPLING = {
    "greedy": dict(temperature=0.0),
    "qwen": dict(temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05),  # the checkpoints' defaults
    "top-p": dict(temperature=0.8, top_p=0.95),
}


def timed(phases: dict, label: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        phases[label] += time.perf_counter() - start
        return out

    return wrapper


def run(model: str, args) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    llm = LLM(model, device=args.device, progress=False, kv_cache_memory_gib=args.kv_cache_gib,
              max_num_seqs=args.seqs, max_model_len=args.prompt_len + args.steps + 64, enforce_eager=True)
    engine = llm.core
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.steps + 32, ignore_eos=True, **SAMPLING[args.sampling])
    for i in range(args.seqs):
        llm.submit(llm.inputs.prompt(f"host-{i}", [rng.randrange(100, 50_000) for _ in range(args.prompt_len)],
                                     params))
    while engine.scheduler.num_waiting or any(not s.output_token_ids for s in engine.scheduler.running):
        llm.step()  # prefill every prompt, so that each timed step decodes all sequences
    phases: dict[str, float] = defaultdict(float)
    engine.scheduler.schedule = timed(phases, "schedule", engine.scheduler.schedule)
    engine.runner.prepare = timed(phases, "prepare", engine.runner.prepare)
    engine.runner.run = timed(phases, "forward + logits", engine.runner.run)
    engine.runner.sampler.sample = timed(phases, "sample", engine.runner.sampler.sample)
    engine.complete = timed(phases, "complete", engine.complete)
    llm.outputs.process = timed(phases, "output processing", llm.outputs.process)
    start = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    phases["step"] = time.perf_counter() - start
    return {label: seconds / args.steps for label, seconds in phases.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: a tiny random one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=40, help="timed decode steps")
    p.add_argument("--sampling", choices=SAMPLING, default="greedy",
                   help="qwen: generation_config.json's defaults (temperature 0.1, top-k 1, top-p 0.001, repetition "
                        "penalty 1.05), what a request that sets none gets")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="host-overhead-") as tmp:
        model = args.model or str(make_tiny(Path(tmp), TinySpec()))
        per_step = run(model, args)
    host = sum(per_step[label] for label in HOST_PHASES)
    print(f"{args.seqs} sequences decoding, prompts of {args.prompt_len} tokens, "
          f"{args.sampling} sampling, device {args.device}; per step:")
    for label in (*HOST_PHASES, "forward + logits", "sample", "step"):
        print(f"  {label:18s} {per_step[label] * 1e3:8.2f} ms")
    print(f"  {'host (the first 3)':18s} {host * 1e3:8.2f} ms, {host / args.seqs * 1e6:.1f} us per sequence")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
