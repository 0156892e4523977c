"""The planner's memory model against the engine on a GPU, for the Qwen2.5-VL-7B layout with random weights.

Builds the model directly on the GPU (no checkpoint), then compares: the planner's weight bytes with the parameters'
bytes, its KV bytes per block with ModelRunner.kv_bytes_per_block, and its activation peak with
torch.cuda.max_memory_allocated during the engine's own profiling step (ModelRunner.profile_free_blocks), for the
largest allowed image and for a few other settings (language model only, vision tower only, smaller images); and
the KV blocks the engine grants with the planner's.

    python benchmarks/memory_model.py [--json PATH]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from vlserve.config import EngineConfig, SchedulerConfig, parse_config
from vlserve.engine import model_runner
from vlserve.engine.sampler import sample_worst_case
from vlserve.media.options import MediaOptions
from vlserve.model.loader import default_dtype
from vlserve.model.qwen2_5_vl import Qwen2_5_VLForCausalLM
from vlserve.plan.cards import Card
from vlserve.plan.inventory import Inventory, Node
from vlserve.plan.layouts import layout_config
from vlserve.plan.memory import Step, Weights, activation_bytes, image_patches, kv_bytes_per_block, sampler_peak, stages
from vlserve.plan.planner import make_plan

# (label, --max-num-batched-tokens, max_pixels, vision tower on)
SETTINGS = [
    ("defaults: 8192 tokens, largest image 3584x3584", 8192, MediaOptions().max_pixels, True),
    ("language model only, 8192 tokens", 8192, MediaOptions().max_pixels, False),
    ("vision tower only, largest image", 16, MediaOptions().max_pixels, True),
    ("8192 tokens, max_pixels 1003520", 8192, 1_003_520, True),
    ("2048 tokens, max_pixels 3211264", 2048, 3_211_264, True),
]
GIB = 2**30


def random_model(cfg, dtype: torch.dtype, device: torch.device, **_) -> Qwen2_5_VLForCausalLM:
    with torch.device(device), default_dtype(dtype):
        model = Qwen2_5_VLForCausalLM(cfg)
    for p in model.parameters():
        p.normal_(0, 0.02)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = parse_config(layout_config("7B"), "Qwen2.5-VL-7B (random weights)", Path("config.json"))
    props = torch.cuda.get_device_properties(device)
    card = Card(props.name, props.total_memory, torch.cuda.get_device_capability(device))
    engine = EngineConfig(model=cfg.path, dtype="bfloat16")
    model_runner.load_model = random_model  # the engine's runner, around a model built on the GPU
    runner = model_runner.ModelRunner(cfg, engine, device, torch.bfloat16, progress=False)
    stage = stages(cfg, 1)[0]
    params = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    result = {
        "device": props.name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "weights_bytes": {"planner": Weights(cfg).rank_bytes(1, stage, False, 2), "parameters": params,
                          "allocated_after_build": torch.cuda.memory_allocated(device)},
        "kv_bytes_per_block": {"planner": kv_bytes_per_block(cfg, 1, len(stage.layers), 16, 2),
                               "engine": runner.kv_bytes_per_block()},
        "profiles": [],
    }
    visual = runner.model.visual
    for label, tokens, max_pixels, vision in SETTINGS:
        runner.model.visual = visual if vision else None
        sched = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=tokens, max_model_len=32768)
        media = MediaOptions(max_pixels=max_pixels)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        blocks = runner.profile_free_blocks(0.9, sched, media, runner.kv_bytes_per_block())
        seconds = time.perf_counter() - start
        measured = torch.cuda.max_memory_allocated(device) - before
        free, total = torch.cuda.mem_get_info(device)
        patches = image_patches(max_pixels, cfg.vision) if vision else 0
        predicted = activation_bytes(cfg, 1, stage, Step(tokens, 256, patches), False, 2, on_gpu=True)
        planned = make_plan(cfg, Inventory((Node("gpu", (card,)),), "this GPU"),
                            EngineConfig(model=cfg.path, dtype="bfloat16", max_num_batched_tokens=tokens,
                                         media=media)).chosen if vision else None
        result["profiles"].append({
            "setting": label, "tokens": tokens, "image_patches": patches, "activation_measured": measured,
            "activation_planned": predicted, "error": predicted / measured - 1,
            "outside_torch": total - free - torch.cuda.memory_reserved(device),
            "kv_blocks_engine": blocks, "kv_blocks_planned": planned.kv_blocks if planned else None,
            "profile_seconds": round(seconds, 2)})
    runner.model.visual = visual
    for rows in (27, 256):  # the sampler alone: one row chunk, and every seat of --max-num-seqs 256
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        sample_worst_case(rows, cfg.vocab_size, device)
        measured = torch.cuda.max_memory_allocated(device) - before
        planned = sampler_peak(cfg.vocab_size, rows, on_gpu=True)
        result["sampler"] = result.get("sampler", []) + [
            {"rows": rows, "measured": measured, "planned": planned, "error": planned / measured - 1}]
    print(json.dumps(result, indent=2))
    print(f"\n{props.name}: weights {params / GIB:.3f} GiB (planner "
          f"{result['weights_bytes']['planner'] / GIB:.3f}), KV/block {result['kv_bytes_per_block']}")
    for p in result["profiles"]:
        print(f"{p['setting']:<48} measured {p['activation_measured'] / GIB:7.3f} GiB  planned "
              f"{p['activation_planned'] / GIB:7.3f} GiB  ({p['error']:+.1%})  blocks {p['kv_blocks_engine']} vs "
              f"{p['kv_blocks_planned']}")
    for p in result["sampler"]:
        print(f"sampler, {p['rows']} seats: measured {p['measured'] / GIB:.3f} GiB  planned {p['planned'] / GIB:.3f} GiB"
              f"  ({p['error']:+.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
