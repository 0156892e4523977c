"""`vlserve bench serve` against a real `vlserve serve` subprocess on the tiny checkpoint: figures, JSON, 100
concurrent streaming chats with images leaving no KV block behind, and the error paths."""

import json
import re
import time

import numpy as np
import pytest
from live_server import free_port, live_server, wait_all_blocks_free
from PIL import Image

from vlserve.bench.prompts import BenchPrompt, Workload
from vlserve.bench.serve import arrival_gaps, request_body
from vlserve.cli import main

MAX_MODEL_LEN = 512  # small, so one test can send prompts the server must refuse
STARTUP_S = 120
IDLE_POLL_S = 10


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    with live_server(tiny_ckpt, "--max-model-len", str(MAX_MODEL_LEN), "--disable-ui") as (url, _):
        yield url


def bench(capsys, url: str, *args) -> tuple[int, str, str]:
    code = main(["bench", "serve", "--base-url", url, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def figure(out: str, label: str) -> float:
    return float(re.search(rf"^{re.escape(label)}:\s+([\d.]+)", out, re.M)[1])


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_text_figures_and_json(server, tmp_path, capsys, endpoint):
    code, out, err = bench(capsys, server, "--num-prompts", "4", "--input-len", "16", "--output-len", "6",
                           "--endpoint", endpoint, "--json", str(tmp_path / "r.json"))
    assert code == 0 and "Requests: 100%" in err  # the progress bar
    assert (figure(out, "Requests"), figure(out, "Failed requests")) == (4, 0)
    assert figure(out, "Output tokens") == 4 * 6  # ignore_eos
    # completions send the raw text, which tokenizes back to exactly --input-len tokens; chat adds its template
    assert figure(out, "Prompt tokens") == 4 * 16 if endpoint == "completions" else figure(out, "Prompt tokens") > 64
    elapsed = figure(out, "Elapsed (s)")
    assert figure(out, "Output tok/s") == pytest.approx(24 / elapsed, rel=0.05)
    for label in ("TTFT (ms)", "TPOT (ms)", "ITL (ms)", "E2E latency (ms)"):
        assert re.search(rf"^{re.escape(label)}:", out, re.M), label
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["num_requests"], r["failed_requests"], r["output_tokens"], r["errors"]) == (4, 0, 24, [])
    assert r["client"]["endpoint"] == endpoint and "api_key" not in r["client"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert 0 < r[key]["p50"] <= r[key]["p90"] <= r[key]["p99"]
    assert r["ttft_ms"]["p99"] <= r["e2e_latency_ms"]["p99"]


def test_chat_with_images_at_a_request_rate(server, capsys):
    code, out, _ = bench(capsys, server, "--num-prompts", "5", "--input-len", "16", "--output-len", "4",
                         "--image-size", "56x56", "--images-per-prompt", "2", "--request-rate", "20")
    assert code == 0 and figure(out, "Requests") == 5 and figure(out, "Failed requests") == 0
    # 56x56 = 4 tokens an image, plus the chat template around the text
    assert figure(out, "Prompt tokens") > 5 * (16 + 2 * 4) and figure(out, "Output tokens") == 5 * 4
    assert "20/s (Poisson)" in out


def test_request_body():
    prompt = BenchPrompt([1], " hi", [Image.new("RGB", (4, 4))])
    chat = request_body(prompt, "m", Workload(output_len=3), "chat")
    assert chat["ignore_eos"] is True and chat["max_tokens"] == 3 and chat["stream_options"] == {"include_usage": True}
    assert [part["type"] for part in chat["messages"][0]["content"]] == ["image_url", "text"]
    text = request_body(prompt, "m", Workload(ignore_eos=False), "completions")
    assert text["prompt"] == " hi" and "ignore_eos" not in text  # a vLLM extension: sent only when asked for


def test_poisson_arrivals_are_seeded():
    gaps = arrival_gaps(2000, 50.0, seed=3)
    assert np.array_equal(gaps, arrival_gaps(2000, 50.0, seed=3)) and gaps.mean() == pytest.approx(1 / 50, rel=0.1)
    assert not arrival_gaps(5, None, seed=3).any()  # no rate: all at once


def test_100_concurrent_image_chats_leave_the_engine_idle(server, capsys):
    start = time.monotonic()
    code, out, _ = bench(capsys, server, "--num-prompts", "100", "--concurrency", "100", "--image-size", "56x56",
                         "--input-len", "16", "--output-len", "8")
    print(out, f"wall time {time.monotonic() - start:.1f} s", sep="\n")  # shown with -s
    assert code == 0 and figure(out, "Requests") == 100 and figure(out, "Failed requests") == 0
    assert figure(out, "Output tokens") == 800
    wait_all_blocks_free(server, IDLE_POLL_S)  # the engine frees a request's blocks just after its last chunk


def test_failed_requests_are_counted_and_shown(server, tmp_path, capsys):
    code, out, err = bench(capsys, server, "--num-prompts", "2", "--input-len", str(MAX_MODEL_LEN), "--output-len",
                           "4", "--endpoint", "completions", "--json", str(tmp_path / "r.json"))
    assert code == 2 and figure(out, "Requests") == 0 and figure(out, "Failed requests") == 2
    assert "First errors (2 of 2):" in out and "HTTP 400" in out and "all 2 requests failed" in err
    assert json.loads((tmp_path / "r.json").read_text())["errors"][0].startswith("HTTP 400")


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "--model 'nope' is not served there"),
    (["--endpoint", "completions", "--image-size", "56x56"], "/v1/completions takes text only"),
    (["--concurrency", "0"], "--concurrency must be a positive number"),
    (["--background-streams", "0"], "--background-streams must be a positive number"),
    (["--background-streams", "2", "--background-output-len", "0"], "--background-output-len must be a positive"),
    (["--json", "/no/such/folder/r.json"], "its folder does not exist"),
])
def test_bad_settings_exit_2(server, capsys, args, message):
    code, _, err = bench(capsys, server, "--num-prompts", "1", *args)
    assert code == 2 and message in err


def test_unreachable_server_exits_2(capsys):
    code, _, err = bench(capsys, f"http://127.0.0.1:{free_port()}", "--num-prompts", "1")
    assert code == 2 and "cannot reach the server" in err


@pytest.mark.parametrize("args", [[], ["--base-url", "http://127.0.0.1:1", "--endpoint", "embeddings"],
                                  ["--base-url", "http://127.0.0.1:1", "--concurrency", "many"]])
def test_bad_flags_exit_2(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", *args])
    assert e.value.code == 2 and "usage: vlserve bench serve" in capsys.readouterr().err


def test_bad_base_url_exits_2(capsys):
    code, _, err = bench(capsys, "127.0.0.1:8000", "--num-prompts", "1")
    assert code == 2 and "must start with http://" in err


def test_mixed_load_compares_the_streams_alone_and_during_the_workload(server, tmp_path, capsys):
    """Text streams decode alone, then while image chats arrive (sent once every stream has its first token)."""
    code, out, _ = bench(capsys, server, "--num-prompts", "3", "--input-len", "8", "--output-len", "2",
                         "--image-size", "56x56", "--background-streams", "2", "--background-output-len", "64",
                         "--json", str(tmp_path / "m.json"))
    assert code == 0 and figure(out, "Requests") == 3
    assert re.search(r"^Mixed load: 2 text streams of 64 tokens \(0 failed\)", out, re.M)
    m = json.loads((tmp_path / "m.json").read_text())["mixed_load"]
    assert m["itl_alone_ms"]["p99"] > 0 and m["itl_during_workload_ms"]["p99"] > 0
    assert m["itl_p99_ratio"] == pytest.approx(m["itl_during_workload_ms"]["p99"] / m["itl_alone_ms"]["p99"])
    wait_all_blocks_free(server)
