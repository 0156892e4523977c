import json
import os

import pytest
import torch

from vlserve.config import EngineConfig, ModelConfig, resolve_dtype
from vlserve.errors import ConfigError
from vlserve.model.tiny import TinySpec, tiny_config

# The published 7B config.json (flat text fields, nested vision_config), trimmed of unused keys.
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 3584, "intermediate_size": 18944,
    "max_position_embeddings": 128000, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 152064, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "temporal_patch_size": 2},
}


def write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_reads_published_7b_layout(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, QWEN25_VL_7B))
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.mrope_section) == (128, 4, (16, 24, 24))
    assert cfg.vision.head_dim == 80 and cfg.vision.patch_dim == 1176 and cfg.vision.fullatt_block_indexes[-1] == 31


def test_reads_nested_text_config(tmp_path):
    raw = {k: v for k, v in QWEN25_VL_7B.items() if k in ("architectures", "vision_config")}
    raw["text_config"] = {k: v for k, v in QWEN25_VL_7B.items() if k not in raw}
    cfg = ModelConfig.from_dir(write(tmp_path, raw))
    assert cfg.hidden_size == 3584 and cfg.num_hidden_layers == 28


def test_reads_text_only_qwen2(tmp_path):
    cfg = ModelConfig.from_dir(write(tmp_path, tiny_config(TinySpec(text_only=True))))
    assert cfg.vision is None and not cfg.is_multimodal and sum(cfg.mrope_section) * 2 == cfg.head_dim


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json is missing"):
        ModelConfig.from_dir(tmp_path)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"hidden_size": 3585}, "hidden_size"),
    ({"rope_scaling": {"mrope_section": [16, 24, 25]}}, "mrope_section"),
    ({"vision_config": None}, "vision_config"),
    ({"vision_config": {**QWEN25_VL_7B["vision_config"], "out_hidden_size": 2048}}, "vision_config.out_hidden_size"),
    ({"vision_config": {**QWEN25_VL_7B["vision_config"], "num_heads": 7}}, "vision_config.num_heads"),
    ({"vision_config": {**QWEN25_VL_7B["vision_config"], "depth": -1}}, "vision_config.depth"),
    ({"vision_config": {**QWEN25_VL_7B["vision_config"], "fullatt_block_indexes": [40]}},
     "vision_config.fullatt_block_indexes"),
])
def test_inconsistent_fields_name_file_and_field(tmp_path, change, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(write(tmp_path, {**QWEN25_VL_7B, **change}))
    assert "config.json" in str(e.value) and field in str(e.value)


QWEN3 = tiny_config(TinySpec(family="qwen3-vl"))


@pytest.mark.parametrize("vision, text, field", [
    ({"num_position_embeddings": 35}, {}, "vision_config.num_position_embeddings"),  # not a square grid
    ({"num_position_embeddings": None}, {}, "vision_config.num_position_embeddings"),
    ({"deepstack_visual_indexes": [1, 9]}, {}, "vision_config.deepstack_visual_indexes"),  # past the tower
    ({"deepstack_visual_indexes": [0, 1, 2]}, {}, "vision_config.deepstack_visual_indexes"),  # more than 2 layers
    ({}, {"head_dim": 0}, "head_dim"),
    ({}, {"head_dim": 32}, "mrope_section"),  # 16 rotary pairs, the sections sum to 8
])
def test_qwen3_vl_fields_are_checked(tmp_path, vision, text, field):
    raw = {**QWEN3, "vision_config": {**QWEN3["vision_config"], **vision}, "text_config": {**QWEN3["text_config"],
                                                                                         **text}}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dir(write(tmp_path, raw))
    assert "config.json" in str(e.value) and field in str(e.value)


def test_dtype_rules():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("half", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_dtype("int8", "cpu")


def test_a_relative_model_folder_is_resolved_once_at_the_door(tiny_ckpt, monkeypatch):
    """Other nodes, `doctor` and /v1/models's `root` see one absolute path; a hub name stays as given."""
    monkeypatch.chdir(tiny_ckpt.parent)
    relative = os.path.join(".", tiny_ckpt.name)
    assert EngineConfig(model=relative).model == str(tiny_ckpt.resolve())
    assert EngineConfig(model="Qwen/Qwen2.5-VL-7B-Instruct").model == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_every_flag_shows_its_default_in_help():
    """`--help` of every command names each option's default (a newcomer should not need the source)."""
    import argparse

    from vlserve.cli import build_parser

    def parsers(p, name="vlserve"):
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    yield from parsers(sp, f"{name} {sub}")

    for name, p in parsers(build_parser()):
        text = " ".join(p.format_help().split())
        for a in p._actions:
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and a.help != argparse.SUPPRESS:
                shown = a.default if not isinstance(a.default, (list, tuple)) else list(a.default)
                assert f"default: {shown}" in text or "(default:" in (a.help or ""), (name, a.option_strings)


def test_encoder_budget_defaults_to_the_largest_image(tiny_ckpt, qwen3_vl_ckpt):
    """--max-num-encoder-tokens unset: the tokens of the largest image max_pixels allows (what the profiling step
    encodes), in each checkpoint's patch geometry; text-only models have none; 0 is refused, naming the flag."""
    import argparse
    from dataclasses import replace

    from vlserve.args import add_engine_args, engine_config
    from vlserve.media.options import MediaOptions

    for ckpt, side in ((tiny_ckpt, 28), (qwen3_vl_ckpt, 32)):
        cfg = ModelConfig.from_dir(ckpt)
        assert EngineConfig(model=str(ckpt)).encoder_tokens(cfg) == (int(MediaOptions().max_pixels ** 0.5) // side) ** 2
        assert EngineConfig(model=str(ckpt), max_num_encoder_tokens=900).encoder_tokens(cfg) == 900
        assert EngineConfig(model=str(ckpt)).encoder_tokens(replace(cfg, vision=None)) is None
    p = argparse.ArgumentParser()
    add_engine_args(p)
    with pytest.raises(ConfigError, match="--max-num-encoder-tokens"):
        engine_config(p.parse_args(["--max-num-encoder-tokens", "0"]), str(tiny_ckpt))
