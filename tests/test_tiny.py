import json

import pytest
import torch
from safetensors import safe_open
import transformers
from transformers import AutoTokenizer, Qwen2ForCausalLM

from vlserve.cli import main
from vlserve.config import ModelConfig


def test_transformers_loads_tiny_checkpoints(any_ckpt):
    cfg = ModelConfig.from_dir(any_ckpt)
    model, info = getattr(transformers, cfg.architecture).from_pretrained(any_ckpt, dtype=torch.float32,
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.text_config.num_key_value_heads == cfg.num_key_value_heads


def test_tokenizer_and_chat_template(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|image_pad|>", "<|video_pad|>"]) == [151645, 151655, 151656]


def test_cli_options_seed_and_shards(tmp_path):
    args = ["--layers", "3", "--kv-heads", "1", "--tie-word-embeddings", "--vision-depth", "8",
            "--fullatt-blocks", "3,7", "--shards", "2", "--seed", "7"]
    assert main(["make-tiny", str(tmp_path / "a"), *args]) == 0
    assert main(["make-tiny", str(tmp_path / "b"), *args]) == 0
    cfg = ModelConfig.from_dir(tmp_path / "a")
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (3, 1, True)
    assert cfg.vision.depth == 8 and cfg.vision.fullatt_block_indexes == (3, 7)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and "lm_head.weight" not in index["weight_map"]
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()  # same seed, same bytes


def test_qwen3_vl_family_options(tmp_path):
    """Qwen3-VL's layout: nested text_config with head_dim, DeepStack blocks, checkpoint names under model.*."""
    assert main(["make-tiny", str(tmp_path), "--family", "qwen3-vl", "--head-dim", "32", "--vision-depth", "5",
                 "--deepstack-blocks", "0,4"]) == 0
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["text_config"]["head_dim"] == 32 and raw["vision_config"]["deepstack_visual_indexes"] == [0, 4]
    cfg = ModelConfig.from_dir(tmp_path)
    assert (cfg.head_dim, cfg.qk_norm, cfg.attention_bias, cfg.mrope_interleaved) == (32, True, False, True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.language_model.layers.0.self_attn.q_norm.weight" in names
    assert "model.visual.deepstack_merger_list.1.linear_fc2.bias" in names and "model.visual.pos_embed.weight" in names


def test_text_only_checkpoint(tmp_path):
    assert main(["make-tiny", str(tmp_path), "--text-only"]) == 0
    model = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config.architectures == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("args, message", [
    (["--heads", "4", "--kv-heads", "3"], "--kv-heads"),
    (["--fullatt-blocks", "1,x"], "--fullatt-blocks"),
    (["--fullatt-blocks", "9"], "fullatt_block_indexes"),
    (["--family", "qwen3-vl", "--deepstack-blocks", "0,9"], "deepstack_visual_indexes"),
    (["--family", "qwen3-vl", "--deepstack-blocks", "0,1,2"], "as many language-model layers"),
])
def test_cli_bad_options(tmp_path, capsys, args, message):
    assert main(["make-tiny", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_files_are_readable_by_all_like_any_checkpoint(tmp_path, monkeypatch):
    """Served from a shared folder or a container under another user, the weights must be readable (safetensors
    writes 0600); the demo checkpoint's folder too (mkdtemp makes it the owner's alone)."""
    from vlserve.model.tiny import demo_checkpoint

    assert main(["make-tiny", str(tmp_path / "a"), "--shards", "2"]) == 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    demo = demo_checkpoint()
    for folder in (tmp_path / "a", demo):
        assert folder.stat().st_mode & 0o005 == 0o005
        for path in folder.iterdir():
            assert path.stat().st_mode & 0o044 == 0o044, path


def test_make_tiny_awq_writes_autoawq_tensors(tmp_path):
    assert main(["make-tiny", str(tmp_path), "--awq", "32", "--intermediate-size", "96"]) == 0
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.quantization["quant_method"] == "awq" and cfg.quantization["group_size"] == 32
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.down_proj.qweight").get_shape() == [96, 8]
        assert f.get_slice("model.layers.0.mlp.down_proj.scales").get_dtype() == "F16"
    assert "model.layers.0.mlp.down_proj.weight" not in names and "visual.blocks.0.mlp.down_proj.weight" in names
