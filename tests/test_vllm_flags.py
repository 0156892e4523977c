"""A copied `vllm serve` line: its flags are taken (or refused with what to change), a misspelt one gets "did you
mean", and a Hugging Face model name is found in the hub's cache (laid out as huggingface_hub writes it)."""

import shutil

import huggingface_hub.constants
import pytest

from vlserve import LLM, SamplingParams
from vlserve.cli import build_parser, main
from vlserve.errors import ConfigError, PlanError
from vlserve.media.template import read_chat_template
from vlserve.media.templates import TOOLS_TEMPLATE
from vlserve.serve.server import served_name

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tiny_ckpt, tmp_path, monkeypatch):
    """A cache holding "Qwen/Tiny-VL" as `hf download` leaves it; the network is off (as in CI)."""
    repo = tmp_path / "models--Qwen--Tiny-VL"
    shutil.copytree(tiny_ckpt, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_a_model_name_is_served_from_the_hub_cache(hub_cache):
    llm = LLM("Qwen/Tiny-VL", download_dir=str(hub_cache), max_model_len=256)
    assert llm.core.config.model.endswith(f"snapshots/{REVISION}")
    out = llm.generate(["hi"], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    assert served_name("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"  # as vLLM names it


def test_a_name_not_in_the_cache_says_how_to_fetch_it(hub_cache):
    with pytest.raises(ConfigError, match=f"hf download Qwen/Missing-VL --cache-dir {hub_cache}"):
        LLM("Qwen/Missing-VL", download_dir=str(hub_cache))


def test_quantization_is_checked_against_the_checkpoint(tiny_ckpt):
    with pytest.raises(PlanError, match="--quantization awq does not match the checkpoint.*drop --quantization"):
        LLM(tiny_ckpt, quantization="awq", max_model_len=256)


def test_chat_template_flag(tmp_path):
    assert read_chat_template(str(TOOLS_TEMPLATE)) == TOOLS_TEMPLATE.read_text()
    assert read_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"  # the text itself
    with pytest.raises(ConfigError, match="is not a file"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="does not parse as Jinja"):
        read_chat_template(str(broken))


def test_a_misspelt_flag_gets_did_you_mean(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "x", "--max-model-length", "4096", "--kv-cache-dtype", "fp8"])
    err = capsys.readouterr().err
    assert "--max-model-length: did you mean --max-model-len?" in err
    assert "--kv-cache-dtype is not a vlserve flag" in err


def test_vllm_flags_are_taken(tiny_ckpt, capsys):
    tiny_ckpt = str(tiny_ckpt)
    args = build_parser().parse_args(["serve", tiny_ckpt, "--trust-remote-code", "--disable-log-requests",
                                      "--disable-log-stats", "--tokenizer", tiny_ckpt, "--download-dir", "/tmp",
                                      "--uvicorn-log-level", "warning", "-q", "awq"])
    assert args.trust_remote_code and args.disable_log_requests and args.quantization == "awq"
    assert main(["serve", tiny_ckpt, "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice needs --tool-call-parser" in capsys.readouterr().err
