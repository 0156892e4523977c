"""`vlserve bench offline` on the tiny checkpoint: printed figures, JSON, prompt generation, statistics, errors."""

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlserve.bench.prompts import Workload, make_prompts, openai_image_part
from vlserve.bench.stats import RequestTiming, percentiles_ms, summarize
from vlserve.cli import main
from vlserve.media.template import load_tokenizer
from vlserve.model.tiny import demo_checkpoint

SMALL = ["--num-prompts", "6", "--input-len", "32", "--output-len", "8", "--kv-cache-memory-gib", "0.02"]


def bench(capsys, *args) -> tuple[str, str]:
    assert main(["bench", "offline", *args]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def figure(out: str, label: str) -> float:
    return float(re.search(rf"^{re.escape(label)}:\s+([\d.]+)", out, re.M)[1])


def test_text_figures_and_json(tiny_ckpt, tmp_path, capsys):
    out, err = bench(capsys, str(tiny_ckpt), *SMALL, "--json", str(tmp_path / "r.json"))
    assert "Requests: 100%" in err  # the progress bar
    assert figure(out, "Requests") == 6 and figure(out, "Prompt tokens") == 6 * 32
    assert figure(out, "Output tokens") == 6 * 8  # --ignore-eos is the default
    elapsed = figure(out, "Elapsed (s)")
    assert figure(out, "Output tok/s") == pytest.approx(48 / elapsed, rel=0.05)
    assert figure(out, "Total tok/s") == pytest.approx((192 + 48) / elapsed, rel=0.05)
    for label in ("Device", "Dtype", "TTFT (ms)", "TPOT (ms)", "E2E latency (ms)", "Prefix cache hit rate",
                  "Preemptions"):
        assert re.search(rf"^{re.escape(label)}:", out, re.M), label
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["model"], r["device"], r["dtype"]) == (str(tiny_ckpt), "cpu", "float32")
    assert (r["num_requests"], r["prompt_tokens"], r["output_tokens"]) == (6, 192, 48)
    assert r["workload"]["input_len"] == 32 and r["engine"]["kv_cache_memory_gib"] == 0.02
    assert r["output_tokens_per_s"] == pytest.approx(48 / r["elapsed_s"])
    for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
        assert 0 < r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"]
    assert r["ttft_ms"]["p99"] <= r["e2e_latency_ms"]["p99"] and r["preemptions"] == 0


def test_images(tiny_ckpt, capsys):
    out, _ = bench(capsys, str(tiny_ckpt), *SMALL, "--image-size", "56x56", "--images-per-prompt", "2")
    # 56x56 = 2x2 merged patches = 4 tokens an image, plus the chat template around the 32 text tokens
    assert figure(out, "Prompt tokens") > 6 * (32 + 2 * 4) and figure(out, "Output tokens") == 48
    assert figure(out, "Prefix cache hit rate") == 0  # distinct images, and the first block holds one's tokens


@pytest.mark.parametrize("args", [["--dataset", "fixed"], ["--dataset", "fixed", "--image-size", "56x56",
                                                           "--same-image"]])
def test_fixed_prompts_hit_the_prefix_cache(tiny_ckpt, capsys, args):
    out, _ = bench(capsys, str(tiny_ckpt), *SMALL, "--temperature", "0", *args)
    assert figure(out, "Prefix cache hit rate") > 0 and figure(out, "Output tokens") == 48


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def test_prompts(tokenizer):
    prompts = make_prompts(Workload(num_prompts=4, input_len=50, image_size=(60, 40), images_per_prompt=2),
                           tokenizer)
    for p in prompts:  # the text tokenizes back to its ids, so an HTTP benchmark sends the same lengths
        assert len(p.text_ids) == 50 and tokenizer(p.text, add_special_tokens=False)["input_ids"] == p.text_ids
        assert max(p.text_ids) < 151643  # no special or media token
    assert len({tuple(p.text_ids) for p in prompts}) == 4
    images = [im.tobytes() for p in prompts for im in p.images]
    assert len(images) == 8 and len(set(images)) == 8 and prompts[0].images[0].size == (60, 40)
    assert make_prompts(Workload(num_prompts=4, input_len=50), tokenizer)[0].text_ids == prompts[0].text_ids  # seeded

    fixed = make_prompts(Workload(num_prompts=3, input_len=20, dataset="fixed", image_size=(28, 28),
                                  same_image=True), tokenizer)
    assert fixed[0].text_ids == fixed[2].text_ids and len(fixed[0].text_ids) == 20
    assert fixed[0].images[0].tobytes() == fixed[2].images[0].tobytes()


def test_openai_messages(tokenizer):
    prompt = make_prompts(Workload(num_prompts=1, input_len=8, image_size=(30, 20)), tokenizer)[0]
    [message] = prompt.messages(openai_image_part)
    image, text = message["content"]
    assert message["role"] == "user" and text == {"type": "text", "text": prompt.text}
    header, data = image["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).tobytes() == prompt.images[0].tobytes()


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentiles_match_numpy(n):
    seconds = np.random.default_rng(n).exponential(0.05, n).tolist()
    p = percentiles_ms(seconds)
    ms = np.array(seconds) * 1000
    assert [p.p50, p.p90, p.p99] == pytest.approx(np.percentile(ms, [50, 90, 99]).tolist())
    assert p.mean == pytest.approx(ms.mean())
    assert percentiles_ms([]) is None


def test_summary():
    timings = [RequestTiming(10, 5, ttft=0.1, latency=0.5), RequestTiming(20, 1, ttft=0.2, latency=0.2)]
    s = summarize(timings, elapsed_s=2.0, prefix_cache_hit_rate=0.5, preemptions=3)
    assert (s.num_requests, s.prompt_tokens, s.output_tokens) == (2, 30, 6)
    assert (s.requests_per_s, s.output_tokens_per_s, s.total_tokens_per_s) == (1.0, 3.0, 18.0)
    assert s.tpot_ms.p50 == pytest.approx(100.0)  # (0.5 - 0.1) / 4; a one-token request has no TPOT
    assert s.ttft_ms.p50 == pytest.approx(150.0) and s.e2e_latency_ms.p99 == pytest.approx(497.0)


@pytest.mark.parametrize("args, flag", [
    (["--input-len", "0"], "--input-len"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--output-len", "0"], "--output-len"),
    (["--image-size", "56"], "--image-size"),
    (["--image-size", "0x56"], "--image-size"),
    (["--dataset", "sharegpt"], "--dataset"),
    (["--images-per-prompt", "2"], "--image-size"),
    (["--image-size", "56x56", "--images-per-prompt", "0"], "--images-per-prompt"),
    (["--temperature", "-1"], "--temperature"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--input-len", "32", "--output-len", "16", "--max-model-len", "40"], "--max-model-len"),
    (["--json", "no-such-folder/r.json"], "--json"),
])
def test_bad_flags(tiny_ckpt, capsys, args, flag):
    assert main(["bench", "offline", str(tiny_ckpt), "--kv-cache-memory-gib", "0.02", *args]) == 2
    err = capsys.readouterr().err
    assert "vlserve bench: error:" in err and flag in err


def test_demo_checkpoint_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = demo_checkpoint()
    assert path == tmp_path / "vlserve" / "demo-tiny" and (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo_checkpoint() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == ["demo-tiny"]  # no temporary folder left behind
