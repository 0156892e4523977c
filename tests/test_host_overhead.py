"""benchmarks/host_overhead.py's smoke run: every phase of a decode step is timed, and the steps it times are
decode steps of every sequence."""

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
_spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
host_overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_overhead)


def test_times_each_phase_of_decode_steps(tiny_ckpt, capsys):
    assert host_overhead.main(["--model", str(tiny_ckpt), "--seqs", "5", "--prompt-len", "20", "--steps", "3",
                               "--sampling", "qwen", "--kv-cache-gib", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "5 sequences decoding, prompts of 20 tokens, qwen sampling, device cpu" in out
    ms = {label: float(m.group(1)) for label in ("schedule", "prepare", "complete", "forward \\+ logits",
                                                  "sample", "step")
          if (m := re.search(rf"  {label} +([0-9.]+) ms", out))}
    assert len(ms) == 6 and all(v > 0 for v in ms.values()), out
    assert ms["step"] >= ms["schedule"] + ms["prepare"] + ms["complete"]


def test_each_timed_step_decodes_every_sequence(tiny_ckpt, monkeypatch):
    seen = []
    original = host_overhead.LLM

    def spying_llm(*args, **kwargs):
        llm = original(*args, **kwargs)
        prepare = llm.core.runner.prepare
        llm.core.runner.prepare = lambda scheduled, departed: seen.append([s.num_new_tokens for s in scheduled]) or prepare(scheduled, departed)
        return llm

    monkeypatch.setattr(host_overhead, "LLM", spying_llm)
    args = host_overhead.argparse.Namespace(device="cpu", seqs=4, prompt_len=20, steps=3, sampling="greedy", threads=1,
                                            kv_cache_gib=0.05)
    host_overhead.run(str(tiny_ckpt), args)
    assert seen[-3:] == [[1, 1, 1, 1]] * 3
