"""How long global rank 0 spends handing one step to the other ranks: the pickled StepInput over Gloo (how steps
travelled before) against packed_step.py (an int64 header on Gloo, one int32 buffer on the model's group), for a
decode step of N sequences and a prefill step with image embeddings. Two processes on this machine, Gloo (CPU).

    python benchmarks/step_broadcast.py [--seqs 256] [--steps 200] [--json PATH]
"""

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vlserve.distributed import packed_step
from vlserve.distributed.executor import free_port
from vlserve.engine.model_runner import StepInput
from vlserve.model.layers.attention import AttentionMetadata

HIDDEN = 3584  # Qwen2.5-VL-7B's embedding width


def decode_step(seqs: int, context: int = 1024, block_size: int = 16) -> StepInput:
    lengths = np.ones(seqs, dtype=np.int64)
    width = context // block_size
    tables = np.arange(seqs * width, dtype=np.int32).reshape(seqs, width)
    slots = tables[:, -1].astype(np.int64) * block_size
    meta = AttentionMetadata.paged(lengths, np.full(seqs, context), tables, slots)
    return StepInput(torch.randint(0, 150_000, (seqs,)), torch.arange(seqs) + context, meta, None, None,
                     torch.arange(seqs))


def prefill_step(tokens: int = 8192, image_tokens: int = 1280, block_size: int = 16) -> StepInput:
    lengths = np.array([tokens], dtype=np.int64)
    tables = np.arange(tokens // block_size, dtype=np.int32)[None]
    meta = AttentionMetadata.paged(lengths, lengths, tables, np.arange(tokens))
    return StepInput(torch.randint(0, 150_000, (tokens,)), torch.arange(3 * tokens).view(3, tokens), meta,
                     torch.randn(image_tokens, HIDDEN, dtype=torch.bfloat16), torch.arange(image_tokens),
                     torch.tensor([tokens - 1]))


def worker(rank: int, init: str, cases: list[str], steps: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    control = dist.new_group(backend="gloo")
    for _ in cases:
        for _ in range(steps):
            dist.broadcast_object_list([None], src=0, group=control)
        for _ in range(steps):
            packed_step.receive(control, torch.device("cpu"), torch.bfloat16)
        dist.barrier()
    dist.destroy_process_group()


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args()
    cases = {f"decode, {args.seqs} sequences, 1024-token contexts": decode_step(args.seqs),
             "prefill, 8192 tokens with a 1280-token image": prefill_step()}
    init = f"tcp://127.0.0.1:{free_port()}"
    other = mp.get_context("spawn").Process(target=worker, args=(1, init, list(cases), args.steps))
    other.start()
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=2)
    control = dist.new_group(backend="gloo")
    rows = []
    for label, step in cases.items():
        pickled = timed(lambda: dist.broadcast_object_list([("run", (step,))], src=0, group=control), args.steps)
        packed = timed(lambda: packed_step.send_step(step, control, torch.device("cpu")), args.steps)
        dist.barrier()
        rows.append({"step": label, "pickled_ms": pickled * 1e3, "packed_ms": packed * 1e3,
                     "speedup": pickled / packed})
        print(f"{label:<48} pickled {pickled * 1e3:8.3f} ms   packed {packed * 1e3:8.3f} ms   "
              f"{pickled / packed:5.1f}x")
    dist.destroy_process_group()
    other.join()
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "backend": "gloo (CPU)",
                                               "cpus": mp.cpu_count(), "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
