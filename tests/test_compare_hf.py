"""--load-format dummy (random weights, no checkpoint read) and benchmarks/compare_hf.py's smoke run on the CPU."""

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from vlserve import LLM, SamplingParams
from vlserve.args import add_engine_args, engine_config
from vlserve.config import EngineConfig, ModelConfig
from vlserve.errors import CheckpointError, ConfigError
from vlserve.model.loader import load_model
from vlserve.model.qwen2_5_vl import Qwen2_5_VLForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_hf.py"
_spec = importlib.util.spec_from_file_location("compare_hf", SCRIPT)
compare_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_hf)


@pytest.fixture(scope="module")
def weightless(tmp_path_factory) -> Path:
    """The tiny layout's config.json, tokenizer and templates, and no weights."""
    return compare_hf.write_model_folder("tiny", tmp_path_factory.mktemp("weightless"))


def test_dummy_engine_generates_without_weights(weightless):
    assert not list(weightless.glob("*.safetensors"))
    llm = LLM(str(weightless), load_format="dummy", device="cpu", kv_cache_memory_gib=0.01, progress=False)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": list(range(100, 120))}, params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5
    llm.core.shutdown()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):  # auto really reads the checkpoint
        LLM(str(weightless), device="cpu", kv_cache_memory_gib=0.01, progress=False)


def test_dummy_weights_are_seeded_and_scaled(weightless):
    cfg = ModelConfig.from_dir(weightless)
    a, b = (load_model(cfg, torch.float32, "cpu", load_format="dummy") for _ in range(2))
    params_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, params_b[name]), name
        assert torch.isfinite(p).all()
    norm = a.model.norm.weight
    assert abs(norm.mean().item() - 1) < 0.05  # norms near 1, not near 0 as the matrices
    q = a.model.layers["0"].self_attn.qkv_proj.weight
    assert q.std().item() == pytest.approx(cfg.hidden_size ** -0.5, rel=0.1)  # std 1/sqrt(fan_in)


def test_load_format_flag():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config(p.parse_args(["--load-format", "dummy"]), "m").load_format == "dummy"
    assert engine_config(p.parse_args([]), "m").load_format == "auto"
    with pytest.raises(ConfigError, match="--load-format 'random' must be auto .* or dummy"):
        EngineConfig(model="m", load_format="random")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_decode_bytes_of_the_7b_layout(tmp_path):
    cfg = ModelConfig.from_dir(compare_hf.write_model_folder("7b", tmp_path))
    with torch.device("meta"):  # shapes only
        model = Qwen2_5_VLForCausalLM(cfg)
    assert count(model) == pytest.approx(8.29e9, rel=0.005)  # Qwen2.5-VL-7B's published size
    # a decode step leaves the vision tower idle and reads one embedding row; KV: 28 layers x 2 x 4 heads x 128
    weights = 2 * (count(model) - count(model.visual) - count(model.model.embed_tokens))
    assert compare_hf.decode_bytes_per_token(cfg, torch.bfloat16, 0) == weights
    kv = compare_hf.decode_bytes_per_token(cfg, torch.bfloat16, 10) - compare_hf.decode_bytes_per_token(
        cfg, torch.bfloat16, 0)
    assert kv == 10 * 28 * 2 * 4 * 128 * 2


def test_smoke_run_on_cpu(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert compare_hf.main(["--layout", "tiny", "--device", "cpu", "--dtype", "float32", "--num-requests", "3",
                            "--hf-batch", "2", "--input-len", "16", "--output-len", "4", "--prefill-len", "48",
                            "--image-size", "56x56", "--image-text-len", "8", "--repeats", "1",
                            "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    r = json.loads(out_json.read_text())
    assert "host memcpy" in r["Bandwidth"] and "host memcpy" in out
    assert [row["workload"] for row in r["rows"]] == list(compare_hf.WORKLOADS)
    for row in r["rows"]:
        for side in ("vlserve", "transformers", "speedup"):
            assert math.isfinite(row[side]) and row[side] > 0, (row["workload"], side)
        assert row["target"] is None and row["met"] is None  # the targets are the 7B layout's on an H100
        printed = next(line for line in out.splitlines() if line.startswith(row["workload"] + " "))
        assert f"{row['vlserve']:.1f}" in printed and f"{row['transformers']:.1f}" in printed
    fraction = r["rows"][0]["roofline_fraction"]
    assert 0 < fraction["vlserve"] and 0 < fraction["transformers"]


def test_workload_subset_and_unknown(tmp_path, capsys):
    args = compare_hf.parse_args(["--workloads", "ttft,decode1"])
    assert args.workloads == ["ttft", "decode1"]
    with pytest.raises(SystemExit):
        compare_hf.parse_args(["--workloads", "decode1,nonsense"])
    assert "choose from decode1,throughput,ttft,prefill8k" in capsys.readouterr().err
