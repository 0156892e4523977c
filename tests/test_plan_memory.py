"""The memory model against the engine's own modules: the real 3B/7B/72B layouts built on the meta device (shapes,
no memory) for each rank of a tensor/pipeline-parallel layout, in both vision modes; parameter bytes and KV bytes
per block must equal the planner's to the byte. The sampler's worst case, as the profiling step runs it, peaks
where the planner says (allocations counted by torch.profiler on the CPU)."""

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlserve.config import parse_config
from vlserve.distributed.parallel_state import (
    PipelineStage,
    TensorParallelGroup,
    reset,
    set_pipeline_stage,
    set_tp_group,
)
from vlserve.engine.model_runner import ModelRunner
from vlserve.media.options import MediaOptions
from vlserve.model.layers.attention import Attention
from vlserve.model.loader import default_dtype
from vlserve.model.qwen2_5_vl import Qwen2_5_VLForCausalLM
from vlserve.plan.layouts import layout_config, qwen2_vl_config, qwen3_vl_config
from vlserve.engine.sampler import sample_worst_case
from vlserve.plan.memory import Weights, image_patches, kv_bytes_per_block, sampler_peak, stages


def rank_model(cfg, tp: int, rank: int, pp: int, stage: int, mode: str):
    set_tp_group(TensorParallelGroup(rank, tp, None))
    set_pipeline_stage(PipelineStage(stage, pp))
    try:
        with torch.device("meta"), default_dtype(torch.bfloat16):
            return Qwen2_5_VLForCausalLM(cfg, mode)
    finally:
        reset()


@pytest.mark.parametrize("size, tp, pp, mode", [
    ("7B", 1, 1, "data"), ("7B", 4, 2, "weights"), ("7B", 2, 3, "data"), ("3B", 8, 1, "data"),  # 3B: tied embeddings
    ("3B", 2, 4, "weights"), ("72B", 8, 2, "weights"), ("72B", 8, 3, "data"),  # 72B at TP 8: KV heads 8 -> 1 per rank
    ("3B", 16, 1, "data"),  # more ranks than KV heads: replicated
    ("Qwen2-VL-2B", 2, 2, "weights"), ("Qwen2-VL-72B", 8, 2, "weights"),  # LayerNorms, fc1/fc2 split
    ("72B-AWQ", 4, 2, "data"), ("72B-AWQ-29568", 2, 2, "data"), ("72B-AWQ-29568", 8, 1, "weights"),  # padded MLP
    ("7B-GPTQ", 2, 2, "data"), ("72B-GPTQ", 8, 1, "data"),
    ("Qwen3-VL-4B", 2, 2, "weights"), ("Qwen3-VL-32B", 8, 2, "data"),  # q/k norms, DeepStack mergers, tied (4B)
])
def test_weights_and_kv_per_rank_to_the_byte(size, tp, pp, mode):
    if size.startswith("Qwen2-VL"):
        raw = qwen2_vl_config(size.split("-")[-1])
    elif size.startswith("Qwen3-VL"):
        raw = qwen3_vl_config(size.split("-")[-1])
    elif size.startswith("72B-AWQ"):
        raw = layout_config("72B", awq=True, intermediate_size=29568 if size.endswith("29568") else None)
    elif size.endswith("-GPTQ"):
        raw = layout_config(size.split("-")[0]) | {"quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}}
    else:
        raw = layout_config(size)
    cfg = parse_config(raw, size, Path("config.json"))
    weights = Weights(cfg)
    for stage in stages(cfg, pp):
        for rank in sorted({0, tp - 1}):  # the last rank holds the vocabulary's zero-padded tail
            model = rank_model(cfg, tp, rank, pp, stage.index, mode)
            real = sum(p.numel() * p.element_size() for p in model.parameters())
            assert weights.rank_bytes(tp, stage, mode == "weights" and tp > 1, 2) == real, (stage, rank)
            runner = SimpleNamespace(attention_layers=[m for m in model.modules() if isinstance(m, Attention)],
                                     block_size=16, dtype=torch.bfloat16)
            assert kv_bytes_per_block(cfg, tp, len(stage.layers), 16, 2) == ModelRunner.kv_bytes_per_block(runner)


def test_7b_figures():
    """Qwen2.5-VL-7B: 8.29 B parameters; 28 layers x K,V x 4 KV heads x 128 dims x 2 bytes = 56 KiB per token."""
    cfg = parse_config(layout_config("7B"), "7B", Path("config.json"))
    stage = stages(cfg, 1)[0]
    assert Weights(cfg).rank_bytes(1, stage, False, 2) == 16_584_333_312
    assert kv_bytes_per_block(cfg, 1, 28, 16, 2) == 16 * 57_344


def test_qwen3_vl_8b_figures():
    """Qwen3-VL-8B: 8.77 B parameters (its model card's count); head_dim 128 with 8 KV heads over 36 layers."""
    cfg = parse_config(qwen3_vl_config("8B"), "8B", Path("config.json"))
    params = Weights(cfg).rank_bytes(1, stages(cfg, 1)[0], False, 2) // 2
    assert round(params / 1e9, 2) == 8.77
    assert kv_bytes_per_block(cfg, 1, 36, 16, 2) == 16 * 36 * 2 * 8 * 128 * 2


@pytest.mark.parametrize("name, arch, layers", [
    ("Qwen/Qwen3-VL-8B-Instruct", "Qwen3VLForConditionalGeneration", 36),
    ("qwen3-vl-2b-thinking", "Qwen3VLForConditionalGeneration", 28),
    ("Qwen2-VL-72B-Instruct", "Qwen2VLForConditionalGeneration", 80),
    ("Qwen2.5-VL-3B-Instruct-AWQ", "Qwen2_5_VLForConditionalGeneration", 36),
])
def test_public_layouts_by_name(name, arch, layers):
    from vlserve.plan.layouts import known_layout

    cfg = known_layout(name)
    assert (cfg.architecture, cfg.num_hidden_layers) == (arch, layers)
    assert known_layout("Qwen3-VL-7B-Instruct") is None  # no such size


def test_largest_image_is_what_the_profile_encodes():
    """model_runner.profile_free_blocks: a square of max_pixels, sides floored to multiples of patch x merge."""
    vision = parse_config(layout_config("7B"), "7B", Path("config.json")).vision
    assert image_patches(MediaOptions().max_pixels, vision) == 256 * 256  # 3584 x 3584 pixels, 16,384 tokens
    assert image_patches(1_003_520, vision) == 70 * 70  # side 1001 -> 980
    wider = replace(vision, patch_size=16)  # Qwen3-VL's patches: 32-pixel tokens
    assert image_patches(1_003_520, wider) == 62 * 62  # side 1001 -> 992


def peak_allocated_bytes(fn) -> int:
    """The most bytes alive at once among those `fn` allocates (CPU), from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    alive = peak = 0
    for e in events:
        alive += e.nbytes()
        peak = max(peak, alive)
    return peak


@pytest.mark.parametrize("fixture, dtype", [("tiny_awq", torch.float32), ("tiny_gptq", torch.bfloat16)])
def test_the_cpu_dequantize_peaks_where_the_planner_says(request, fixture, dtype):
    """The plain-torch path's transient copies of the largest 4-bit layer (its merged gate|up), measured."""
    from vlserve.config import ModelConfig
    from vlserve.plan.memory import dequantize_peak

    cfg = ModelConfig.from_dir(request.getfixturevalue(f"{fixture}_ckpt"))
    with default_dtype(dtype):
        model = Qwen2_5_VLForCausalLM(cfg)
    layer = model.model.layers["0"].mlp.gate_up_proj
    assert peak_allocated_bytes(layer.dense_weight) == dequantize_peak(cfg, 1, dtype.itemsize)
    assert dequantize_peak(parse_config(layout_config("7B"), "7B", Path("config.json")), 1, 2) == 0


@pytest.mark.parametrize("rows, vocab", [(8, 151_936), (64, 20_000), (1, 152_064), (100, 152_064), (160, 152_064)])
def test_the_samplers_worst_case_peaks_where_the_planner_says(rows, vocab):
    sample_worst_case(rows, vocab, torch.device("cpu"))  # warm: one-time allocations stay out of the count
    measured = peak_allocated_bytes(lambda: sample_worst_case(rows, vocab, torch.device("cpu")))
    planned = sampler_peak(vocab, rows)
    assert planned * 0.97 <= measured <= planned * 1.03, (measured, planned)
