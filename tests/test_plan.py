"""`vlserve plan`: one test per failure of the catalogue (docs/troubleshooting.md) with the real Qwen2.5-VL layouts,
through the real command line; exit code 0 when feasible, 2 when not; and `serve` refusing before it loads."""

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from vlserve import LLM
from vlserve.args import engine_config
from vlserve.cli import build_parser, main
from vlserve.plan.inventory import driver_cards
from vlserve.plan.layouts import layout_config

LAYOUTS = {
    "3b": layout_config("3B"), "7b": layout_config("7B"), "32b": layout_config("32B"), "72b": layout_config("72B"),
    "72b-awq": layout_config("72B", awq=True),  # the official AWQ checkpoint: MLP padded to 29696
    "72b-awq-29568": layout_config("72B", awq=True, intermediate_size=29568),  # unpadded: 231 groups of 128
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """A folder per layout holding only config.json: all the planner reads."""
    root = tmp_path_factory.mktemp("layouts")
    for name, raw in LAYOUTS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(raw))
    return {name: str(root / name) for name in LAYOUTS}


def plan(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_3b_at_tp6_is_refused_with_the_valid_sizes(capsys, layouts):
    code, report = plan(capsys, layouts["3b"], "-tp", "6", "--cluster", "1x8xA100-80GB")
    assert code == 2 and not report["feasible"] and report["command"] is None
    error = report["errors"][0]
    assert error["code"] == "tp_heads"
    assert "16 attention heads do not divide by 6" in error["message"]
    assert error["fix"].startswith("valid sizes: 1, 2, 4, 8, 16;")


def test_7b_at_tp8_is_refused_28_heads(capsys, layouts):
    code, report = plan(capsys, layouts["7b"], "-tp", "8", "--cluster", "1x8xH100")
    assert code == 2
    assert "28 attention heads do not divide by 8" in report["errors"][0]["message"]
    assert "valid sizes: 1, 2, 4;" in report["errors"][0]["fix"]


@pytest.mark.parametrize("tp, per_rank", [(2, 116), (4, 58), (8, 29)])
def test_72b_awq_unpadded_mlp_is_padded_at_load(capsys, layouts, tp, per_rank):
    """29,568 is 231 groups of 128, which no even TP size splits ("the input size is not aligned with the quantized
    weight shape" elsewhere): vlserve pads it to 29,696 at load, and the plan says so."""
    code, report = plan(capsys, layouts["72b-awq-29568"], "-tp", str(tp), "--cluster", f"1x{tp}xL40S")
    assert code == 0 and report["feasible"] and report["tensor_parallel_size"] == tp
    note = next(n for n in report["notes"] if n["code"] == "awq_padding")
    assert f"29568 (231 groups of 128) does not split into whole groups over {tp} ranks" in note["message"]
    assert f"pads it at load to 29696 ({per_rank} groups a rank" in note["message"]
    _, padded = plan(capsys, layouts["72b-awq"], "-tp", str(tp), "--cluster", f"1x{tp}xL40S")
    weights = [[s["weights_bytes"] for s in r["memory_per_gpu"]] for r in (report, padded)]
    assert weights[0] == weights[1]  # the bytes of the checkpoint published padded


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_72b_awq_padded_checkpoint_is_served(capsys, layouts, tp):
    code, report = plan(capsys, layouts["72b-awq"], "-tp", str(tp), "--cluster", "1x8xL40S")
    assert code == 0 and report["tensor_parallel_size"] == tp and report["command"] is not None
    assert not report["errors"] and "awq_padding" not in [n["code"] for n in report["notes"]]


def test_bf16_on_a_capability_7_5_card_becomes_fp16_and_says_so(capsys, layouts):
    code, report = plan(capsys, layouts["7b"], "--cluster", "1xTitanRTX")
    assert code == 0 and report["dtype"] == "float16"
    note = next(n for n in report["notes"] if n["code"] == "bf16_unsupported")
    assert "TitanRTX (compute capability 7.5) has no bfloat16" in note["message"]
    assert "the checkpoint is bfloat16" in note["message"]
    code, asked = plan(capsys, layouts["7b"], "--cluster", "1xTitanRTX", "--dtype", "bfloat16")
    assert code == 0 and asked["dtype"] == "float16"
    assert "--dtype bfloat16 asked, but TitanRTX" in asked["dtype_reason"]
    assert "--dtype float16" in asked["command"]
    _, ampere = plan(capsys, layouts["7b"], "--cluster", "1xA100-80GB")
    assert ampere["dtype"] == "bfloat16" and not ampere["notes"]


def test_max_model_len_over_the_kv_cache_gives_the_largest_that_fits_and_the_utilization(capsys, layouts):
    fixed = ("--cluster", "1xL4", "--gpu-memory-utilization", "0.9", "--max-num-batched-tokens", "2048")
    code, report = plan(capsys, layouts["7b"], "--max-model-len", "80000", *fixed)
    assert code == 2
    error = report["errors"][0]
    assert error["code"] == "max_model_len_exceeds_kv_cache"
    assert f"{report['kv_cache_tokens']} tokens fit" in error["message"]
    largest = int(error["fix"].split("--max-model-len ")[1].split()[0])
    # the utilization, and a smaller vision cache where the one asked for would not fit in what it leaves
    raised = error["fix"].split("; ")[1].split(" would hold")[0].split()
    assert raised[0] == "--gpu-memory-utilization" and float(raised[1]) > 0.9
    assert largest == report["kv_cache_tokens"] < 80000
    assert plan(capsys, layouts["7b"], "--max-model-len", str(largest), *fixed)[0] == 0
    assert plan(capsys, layouts["7b"], "--max-model-len", str(largest + 16), *fixed)[0] == 2
    raised = ("--cluster", "1xL4", "--max-num-batched-tokens", "2048", *raised)
    assert plan(capsys, layouts["7b"], "--max-model-len", "80000", *raised)[0] == 0


def test_a_vision_cache_larger_than_the_memory_left_outside_the_kv_budget_is_refused(capsys, layouts):
    fixed = ("--cluster", "1xL4", "--gpu-memory-utilization", "0.99", "--max-model-len", "8192")
    code, report = plan(capsys, layouts["7b"], *fixed)  # 1% of 24 GB: 0.22 GiB, under the 512 MiB default
    assert code == 2 and report["errors"][0]["code"] == "vision_cache"
    assert "--vision-cache-mib 512" in report["errors"][0]["message"]
    smaller = report["errors"][0]["fix"].split("--vision-cache-mib to ")[1].split()[0]
    assert 0 < int(smaller) < 512
    assert plan(capsys, layouts["7b"], *fixed, "--vision-cache-mib", smaller)[0] == 0


def test_a_model_that_cannot_fit_names_the_smallest_gpu_count(capsys, layouts):
    code, report = plan(capsys, layouts["72b"], "--cluster", "1xRTX4090")
    assert code == 2 and report["errors"][0]["code"] == "out_of_memory"
    fix = report["errors"][0]["fix"]
    count = int(fix.split("it needs at least ")[1].split(" x RTX4090")[0])
    assert plan(capsys, layouts["72b"], "--cluster", f"1x{count}xRTX4090")[0] == 0
    assert plan(capsys, layouts["72b"], "--cluster", f"1x{count - 1}xRTX4090")[0] == 2


def test_72b_on_two_machines_of_eight_2080ti_has_a_feasible_plan(capsys, layouts):
    code, report = plan(capsys, layouts["72b"], "--cluster", "2x8xRTX2080Ti")
    assert code == 0 and report["feasible"]
    assert (report["tensor_parallel_size"], report["pipeline_parallel_size"]) == (8, 2)
    assert report["dtype"] == "float16" and report["max_model_len"] >= 8192
    assert "network" in [n["code"] for n in report["notes"]]  # stages on both machines: interfaces matter
    for gpu in report["memory_per_gpu"]:
        used = gpu["weights_bytes"] + gpu["activation_peak_bytes"] + gpu["reserve_bytes"] + gpu["kv_cache_bytes"]
        assert used <= gpu["capacity_bytes"] * report["gpu_memory_utilization"]
    command = report["command"].split()
    assert command[:3] == ["vlserve", "serve", layouts["72b"]]
    assert "--distributed-executor-backend" in command and f"--max-model-len {report['max_model_len']}" in \
        report["command"]
    # The plan takes fewer seats than the default 256, and says so in its command; 512 seats' logits and sampling
    # buffers (3 x 512 x 152k fp32 = 0.87 GiB) do not fit beside the first stage's weights on an 11 GiB card
    assert report["max_num_seqs"] < 256 and f"--max-num-seqs {report['max_num_seqs']}" in report["command"]
    code, asked = plan(capsys, layouts["72b"], "--cluster", "2x8xRTX2080Ti", "--max-num-seqs", "512")
    assert code == 2 and asked["max_num_seqs"] == 512  # what the user set, the planner only checks


def test_mixed_cards_are_sized_by_the_tightest_rank(capsys, layouts):
    code, report = plan(capsys, layouts["72b"], "--cluster", "1x4xA100-80GB,1x4xA100-40GB", "-tp", "4", "-pp", "2")
    assert code == 0
    rows = report["memory_per_gpu"]
    assert {r["device"] for r in rows} == {"A100-80GB", "A100-40GB"}
    util = report["gpu_memory_utilization"]
    spare = [r["capacity_bytes"] * util - r["weights_bytes"] - r["activation_peak_bytes"] - r["reserve_bytes"] -
             r["kv_cache_bytes"] for r in rows]
    assert min(spare) >= 0
    tight = rows[spare.index(min(spare))]
    assert tight["device"] == "A100-40GB" and min(spare) < rows[0]["kv_bytes_per_block"]  # not one block more


def test_every_layout_is_listed_with_why_it_fails(capsys, layouts):
    code, report = plan(capsys, layouts["7b"], "--cluster", "1x8xH100")
    assert code == 0 and report["tensor_parallel_size"] * report["pipeline_parallel_size"] == 1
    pairs = {(x["tensor_parallel_size"], x["pipeline_parallel_size"]): x for x in report["layouts"]}
    assert len(pairs) == sum(8 // tp for tp in range(1, 9))
    assert pairs[(3, 1)]["errors"][0]["code"] == "tp_heads"
    assert all(pairs[(tp, 1)]["feasible"] for tp in (1, 2, 4))
    assert "network" not in [n["code"] for n in report["notes"]]  # one machine
    main(["plan", layouts["7b"], "--cluster", "1x8xH100"])
    text = capsys.readouterr().out
    assert "3 x 1-2: --tensor-parallel-size 3 does not split this model" in text and "<- chosen" in text


def test_pipeline_longer_than_the_model_and_missing_gpus(capsys, layouts):
    code, report = plan(capsys, layouts["7b"], "-pp", "29", "--cluster", "4x8xA100-80GB")
    assert code == 2 and "exceeds the model's 28 layers" in report["errors"][0]["message"]
    code, report = plan(capsys, layouts["7b"], "-tp", "4", "--cluster", "2xA100-80GB")
    assert code == 2 and report["errors"][0]["code"] == "gpus"
    assert "-tp 1 -pp 1 works here" in report["errors"][0]["fix"]  # the fewest cards that hold 7B
    code, report = plan(capsys, layouts["7b"], "-tp", "4", "--cluster", "2x2xA100-80GB")
    assert code == 2 and "needs 4 GPUs in one machine" in report["errors"][0]["message"]


def test_cards_older_than_turing_are_refused(capsys, layouts):
    code, report = plan(capsys, layouts["7b"], "--cluster", "1xV100-32GB")
    assert code == 2 and report["errors"][0]["code"] == "no_kernel_image"


@pytest.mark.parametrize("spec, message", [("H100", "cannot read 'H100'"), ("1x8xFooCard", "unknown card 'FooCard'"),
                                           ("0x8xH100", "at least 1")])
def test_bad_cluster_specs(capsys, layouts, spec, message):
    assert main(["plan", layouts["7b"], "--cluster", spec]) == 2
    assert message in capsys.readouterr().err


def test_public_layouts_by_name(capsys, layouts):
    _, by_name = plan(capsys, "Qwen/Qwen2.5-VL-7B-Instruct", "--cluster", "1xH100")
    _, by_folder = plan(capsys, layouts["7b"], "--cluster", "1xH100")
    assert by_name["memory_per_gpu"] == by_folder["memory_per_gpu"]
    assert main(["plan", "Qwen2.5-VL-13B", "--cluster", "1xH100"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cpu_plan_matches_the_engine(capsys, tiny_ckpt):
    """No GPU here: the plan is this machine's memory, fp32, and the KV cache the CPU engine allocates."""
    code, report = plan(capsys, str(tiny_ckpt), "--kv-cache-memory-gib", "0.01", "--device", "cpu")
    assert code == 0 and report["dtype"] == "float32"
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.01)
    assert report["kv_cache_tokens"] == llm.core.block_manager.num_blocks * 16
    assert report["memory_per_gpu"][0]["kv_bytes_per_block"] == llm.core.runner.kv_bytes_per_block()


def test_plan_answers_without_torch_in_under_a_second(layouts):
    code = ("import sys, time; t = time.perf_counter(); from vlserve.cli import main; "
            f"code = main(['plan', {layouts['72b']!r}, '--cluster', '2x8xRTX2080Ti', '--json']); "
            "print(time.perf_counter() - t, 'torch' in sys.modules, code, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    seconds, torch_loaded, exit_code = out.stderr.split()
    assert (torch_loaded, exit_code) == ("False", "0") and float(seconds) < 1.0


@pytest.fixture(scope="module")
def weightless(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint without its weights: reaching the loader would fail with a safetensors error."""
    folder = tmp_path_factory.mktemp("weightless")
    for f in tiny_ckpt.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder)
    return str(folder)


@pytest.mark.parametrize("flags, says", [
    (["-tp", "3"], "its MLP width 128 does not divide by 3; valid sizes: 1, 2, 4"),
    (["--max-model-len", "30000", "--kv-cache-memory-gib", "0.001"], "--kv-cache-memory-gib 0.02 would hold 30000"),
    (["--max-model-len", "40000"], "exceeds the 32768 positions the model was trained for"),
])
def test_serve_stops_before_loading_with_the_fix(capsys, weightless, flags, says):
    assert main(["serve", weightless, "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "safetensors" not in err


def test_serve_reaches_the_loader_when_the_plan_holds(capsys, weightless):
    assert main(["serve", weightless, "--device", "cpu"]) == 2
    assert "no *.safetensors files" in capsys.readouterr().err


def test_workers_are_spawned_never_forked(tiny_ckpt):
    """Forking after CUDA is initialised fails ("cannot re-initialize CUDA in forked subprocess"): every worker is
    a fresh interpreter running the worker's own entry point (never the user's script)."""
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.01, tensor_parallel_size=2)
    try:
        for worker in llm.core.runner.workers:
            with open(f"/proc/{worker.pid}/cmdline", "rb") as f:
                assert f.read().split(b"\0")[1:3] == [b"-m", b"vlserve.distributed.worker_process"]
    finally:
        llm.core.shutdown()


def test_the_printed_command_reproduces_the_plan(capsys, layouts):
    """Every knob the plan depends on is in its command: planning that command again gives the same plan."""
    asked = ["--cluster", "2x8xRTX2080Ti", "-tp", "8", "-pp", "2", "--mm-encoder-tp-mode", "weights",
             "--gpu-memory-utilization", "0.95", "--max-num-batched-tokens", "1024", "--max-model-len", "1024",
             "--pp-layer-partition", "41,39"]  # 72B on 11 GiB cards: the ladder must also lower seats and max_pixels
    code, first = plan(capsys, layouts["72b"], *asked)
    assert code == 0, first["errors"]
    command = shlex.split(first["command"])
    assert command[:2] == ["vlserve", "serve"] and "--max-num-batched-tokens" in command
    code, again = plan(capsys, *command[2:], "--cluster", "2x8xRTX2080Ti")
    assert code == 0 and again["kv_cache_tokens"] == first["kv_cache_tokens"]
    assert again["command"] == first["command"]


SMI_OUTPUT = """0, GPU-aaaa1111, NVIDIA H100 80GB HBM3, 81559, 9.0
1, GPU-bbbb2222, NVIDIA GeForce RTX 2080 Ti, 11264, 7.5
"""


@pytest.mark.parametrize("visible, names", [
    (None, ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 2080 Ti"]),
    ("1", ["NVIDIA GeForce RTX 2080 Ti"]),
    ("GPU-bbbb,0", ["NVIDIA GeForce RTX 2080 Ti", "NVIDIA H100 80GB HBM3"]),
    ("0,7,1", ["NVIDIA H100 80GB HBM3"]),  # as CUDA does: the list stops at the first entry naming no card
    ("", []),
])
def test_the_driver_lists_the_cards_without_starting_cuda(tmp_path, monkeypatch, visible, names):
    """The live inventory reads nvidia-smi (a fraction of a second) rather than starting CUDA through torch."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'END'\n{SMI_OUTPUT}END\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cards = driver_cards()
    assert [c.name for c in cards] == names
    if names[:1] == ["NVIDIA H100 80GB HBM3"]:
        assert cards[0].memory_bytes == 81559 << 20 and cards[0].capability == (9, 0) and cards[0].bf16


def test_no_driver_tool_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    assert driver_cards() is None


def cpu_plan(model: str, free_gib: float, **engine):
    """A plan for a CPU machine with `free_gib` of memory free (this machine's varies with the load)."""
    from vlserve.config import EngineConfig, ModelConfig
    from vlserve.plan.inventory import Inventory, Node
    from vlserve.plan.planner import make_plan

    config = EngineConfig(model=model, device="cpu", **engine)
    return make_plan(ModelConfig.from_dir(model), Inventory((Node("cpu", (), int(free_gib * 2**30)),), "test"),
                     config)


def test_the_cpu_kv_cache_is_what_the_sequences_need(tiny_ckpt):
    """Unset, --kv-cache-memory-gib is what --max-num-seqs sequences of --max-model-len need (not a fixed 4 GiB),
    and the engine allocates the plan's blocks."""
    plan = cpu_plan(str(tiny_ckpt), 20, max_model_len=256, max_num_seqs=4)
    assert plan.feasible and plan.chosen.kv_blocks == 4 * 256 // 16
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, max_model_len=256, max_num_seqs=4)
    assert llm.core.block_manager.num_blocks == 4 * 256 // 16
    llm.shutdown()


def test_the_cpu_kv_cache_stops_at_the_memory_free(tiny_ckpt):
    plan = cpu_plan(str(tiny_ckpt), 2)
    c = plan.chosen
    assert plan.feasible and 0 < c.kv_tokens < 256 * 32768
    assert sum(r.total for r in c.memory) <= 0.9 * 2 * 2**30 < sum(r.total + r.kv_per_block for r in c.memory)


def test_fp32_weights_over_the_cpu_memory_suggest_bfloat16(layouts):
    """7B in fp32 (30.9 GiB) on a 23.5 GiB machine: the fix is the dtype, not the KV cache."""
    plan = cpu_plan(layouts["7b"], 23.5)
    (error,) = plan.chosen.errors
    assert error.code == "out_of_memory" and "float32 weights (30.89 GiB)" in error.message
    assert error.fix.startswith("--dtype bfloat16 halves the weights and fits (KV cache ")
    assert cpu_plan(layouts["7b"], 23.5, dtype="bfloat16").feasible
    assert cpu_plan(layouts["7b"], 12).chosen.errors[0].fix == "use a GPU or a machine with more memory"


def test_a_cpu_kv_cache_too_large_says_how_much_fits(tiny_ckpt):
    (error,) = cpu_plan(str(tiny_ckpt), 4, kv_cache_memory_gib=8).chosen.errors
    most = float(error.fix.split()[3])
    assert error.code == "out_of_memory" and error.fix.startswith("lower --kv-cache-memory-gib to ")
    assert cpu_plan(str(tiny_ckpt), 4, kv_cache_memory_gib=most).feasible
    assert not cpu_plan(str(tiny_ckpt), 4, kv_cache_memory_gib=most + 0.05).feasible


def test_a_cpu_context_over_the_memory_names_the_largest(layouts):
    (error,) = cpu_plan(layouts["7b"], 24, dtype="bfloat16", max_model_len=100_000).chosen.errors
    assert error.code == "max_model_len_exceeds_kv_cache" and error.fix.startswith("--max-model-len ")
    largest = int(error.fix.split()[1])
    assert cpu_plan(layouts["7b"], 24, dtype="bfloat16", max_model_len=largest).feasible


def test_the_vision_tower_mode_is_searched_too(capsys):
    """32B on 2x8xRTX2080Ti: a tower split over the TP ranks frees memory for the KV cache; the plan must find the
    layouts where that wins (4x4 with weights: 203,600 tokens, against 82,816 for 4x3 with whole towers)."""
    code, report = plan(capsys, "Qwen/Qwen2.5-VL-32B-Instruct", "--cluster", "2x8xRTX2080Ti")
    assert code == 0 and report["mm_encoder_tp_mode"] == "weights" and report["kv_cache_tokens"] >= 203_600


def test_the_memory_free_is_read_where_the_machine_tells_it(monkeypatch):
    """MemAvailable (at most the cgroup's room); with no /proc (macOS), the machine's whole memory as before."""
    from pathlib import Path

    from vlserve.plan.inventory import available_memory_bytes, system_memory_bytes

    assert 0 < available_memory_bytes() <= system_memory_bytes()
    read = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self) == "/proc/meminfo":
            raise FileNotFoundError(self)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    assert available_memory_bytes() == system_memory_bytes()


def test_every_value_the_plan_changed_is_listed(capsys, layouts):
    """72B on four A100s: the chosen 1 x 3 changes nothing; 1 x 2 fits only with knobs lowered and says which; the
    1 x 1 line names the 0.95 it was refused at, and how far the plan went."""
    code, report = plan(capsys, layouts["72b"], "--cluster", "1x4xA100-80GB")
    assert code == 0 and report["changed"] == [] and report["gpu_memory_utilization"] == 0.9
    pairs = {(x["tensor_parallel_size"], x["pipeline_parallel_size"]): x for x in report["layouts"]}
    lowered = {c["knob"]: (c["configured"], c["planned"]) for c in pairs[(1, 2)]["changed"]}
    assert lowered["gpu_memory_utilization"] == (0.9, 0.95) and lowered["max_num_batched_tokens"][0] == 8192
    main(["plan", layouts["72b"], "--cluster", "1x4xA100-80GB"])
    text = capsys.readouterr().out
    refused = next(line for line in text.splitlines() if line.startswith("  1 x 1:"))
    assert "--gpu-memory-utilization 0.95 allows" in refused and "(even with " in refused
    assert "--gpu-memory-utilization 0.95 (not 0.9)" in refused and "--max-num-seqs 32 (not 256)" in refused
    assert "set by the plan" not in text  # the chosen layout as configured
    code, report = plan(capsys, layouts["72b"], "--cluster", "1x2xA100-80GB", "-tp", "1")
    assert code == 0 and {c["knob"] for c in report["changed"]} >= {"gpu_memory_utilization"}
    main(["plan", layouts["72b"], "--cluster", "1x2xA100-80GB", "-tp", "1"])
    assert "set by the plan (flags not given): " in capsys.readouterr().out
    assert report["command"].count("--gpu-memory-utilization 0.95") == 1


def test_flags_given_are_only_checked(capsys, layouts):
    code, report = plan(capsys, layouts["72b"], "--cluster", "1x2xA100-80GB", "-tp", "1", "-pp", "2",
                        "--gpu-memory-utilization", "0.9", "--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
                        "--mm-processor-kwargs", '{"max_pixels": 12845056}')
    assert report["changed"] == [] and report["max_num_seqs"] == 256 and report["gpu_memory_utilization"] == 0.9


def test_serve_uses_the_values_the_plan_changed(capsys, caplog, tiny_ckpt, monkeypatch):
    """On a machine whose free memory holds the tiny model only with --max-num-batched-tokens and max_pixels
    lowered, `serve` without those flags lowers them as `plan` does, says so, and gets the plan's KV cache."""
    monkeypatch.setattr("vlserve.plan.inventory.available_memory_bytes", lambda: int(1.8 * 2**30))
    flags = [str(tiny_ckpt), "--device", "cpu", "--max-model-len", "1024"]
    code, report = plan(capsys, *flags)
    changed = {c["knob"]: c["planned"] for c in report["changed"]}
    assert code == 0 and changed == {"max_num_batched_tokens": 4096, "max_pixels": 4096 * 28 * 28}
    args = build_parser().parse_args(["serve", *flags])
    with caplog.at_level(logging.WARNING, "vlserve.plan"):
        llm = LLM.from_config(engine_config(args, args.model), progress=False)
    assert "--max-num-batched-tokens 4096 (not 8192)" in caplog.text
    config = llm.core.config
    assert (config.max_num_batched_tokens, config.media.max_pixels, config.tunable) == (4096, 4096 * 28 * 28, set())
    assert llm.inputs.config.media.max_pixels == 4096 * 28 * 28  # the input processor refuses larger images
    assert llm.core.block_manager.num_blocks * 16 == report["kv_cache_tokens"]
    llm.shutdown()
