import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_reference import hf_model
from vlserve.config import ModelConfig
from vlserve.errors import CheckpointError
from vlserve.model.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vlserve.model.loader import load_model


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_every_tensor_exactly(any_ckpt):
    cfg = ModelConfig.from_dir(any_ckpt)
    model = load_model(cfg, torch.float32, "cpu", progress=False)
    hf = hf_model(any_ckpt, cfg)
    ours = model.model.layers["0"].self_attn.qkv_proj.weight
    theirs = hf.model.language_model.layers[0].self_attn
    assert torch.equal(ours, torch.cat([theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight]))
    conv = hf.model.visual.patch_embed.proj.weight
    assert torch.equal(model.visual.patch_embed.proj.weight, conv.reshape(conv.shape[0], -1))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casts_to_dtype_and_keeps_rotary_in_fp32(tiny_ckpt, dtype):
    model = load_model(ModelConfig.from_dir(tiny_ckpt), dtype, "cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.model.layers["0"].self_attn.rotary.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "qwen2_vl_ckpt"])
def test_reads_checkpoints_saved_by_transformers_5(request, fixture, tmp_path):
    ckpt = request.getfixturevalue(fixture)
    hf = hf_model(ckpt, ModelConfig.from_dir(ckpt))
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.vision == ModelConfig.from_dir(ckpt).vision
    model = load_model(cfg, torch.float32, "cpu", progress=False)
    assert torch.equal(model.model.norm.weight, hf.model.language_model.norm.weight)
    assert torch.equal(model.visual.merger.ln_q.weight, hf.model.visual.merger.ln_q.weight)


def edit_single_file(ckpt, edit):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    edit_single_file(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 .*model\.layers\.1\.self_attn\.qkv_proj\.weight\[k\]"):
        load_model(ModelConfig.from_dir(ckpt), torch.float32, "cpu", progress=False)


def test_unexpected_tensor_is_named(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    edit_single_file(ckpt, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.mlp\.up_proj\.weight.*config\.json"):
        load_model(ModelConfig.from_dir(ckpt), torch.float32, "cpu", progress=False)


def test_misshaped_tensor_names_both_shapes(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    edit_single_file(ckpt, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 100)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 100\].*"
                                              r"expects \[64, 128\]"):
        load_model(ModelConfig.from_dir(ckpt), torch.float32, "cpu", progress=False)


def test_missing_shard_and_no_weights(tiny_sharded_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_sharded_ckpt, tmp_path / "c")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_model(ModelConfig.from_dir(ckpt), torch.float32, "cpu", progress=False)
    for f in ckpt.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(ModelConfig.from_dir(ckpt), torch.float32, "cpu", progress=False)


def test_corrupt_safetensors(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="damaged or not safetensors"):
        load_model(ModelConfig.from_dir(ckpt), torch.float32, "cpu", progress=False)


def test_bad_index(tiny_sharded_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_sharded_ckpt, tmp_path / "c")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(ModelConfig.from_dir(ckpt), torch.float32, "cpu", progress=False)


def test_rank_reads_only_its_slice(tmp_path):
    """Column/row/QKV layers of rank r in a group of n read their part straight from the lazy file slice."""
    full = {"w": torch.randn(8, 6), "q": torch.randn(4 * 2, 6), "k": torch.randn(1 * 2, 6)}
    save_file(full, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        col = ColumnParallelLinear(6, 8, tp=(1, 2))
        col.weight.weight_loader(col.weight, f.get_slice("w"), "w")
        assert torch.equal(col.weight, full["w"][4:])
        row = RowParallelLinear(6, 8, tp=(1, 2))
        row.weight.weight_loader(row.weight, f.get_slice("w"), "w")
        assert torch.equal(row.weight, full["w"][:, 3:])
        # 4 query heads, 1 KV head, 2 ranks: the KV head is replicated on both ranks.
        qkv = QKVParallelLinear(6, 2, num_heads=4, num_kv_heads=1, bias=False, tp=(1, 2))
        qkv.weight.weight_loader(qkv.weight, f.get_slice("q"), "q", "q")
        qkv.weight.weight_loader(qkv.weight, f.get_slice("k"), "k", "k")
        assert torch.equal(qkv.weight[:4], full["q"][4:]) and torch.equal(qkv.weight[4:6], full["k"])
