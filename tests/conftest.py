"""Shared fixtures: tiny random-weight checkpoints, built once per test session."""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, tests/test_kernels.py runs the Triton kernels under Triton's interpreter. Triton reads this
    # once, when first imported (transformers may import it while test modules are collected), so it is set here.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vlserve.model.tiny import TinySpec, make_tiny  # noqa: E402

# Two shapes: GQA 2:1 untied in one file; GQA 6:1, tied embeddings, deeper vision tower, three shards.
SPECS = {
    "tiny": TinySpec(),
    "tiny_sharded": TinySpec(hidden_size=96, num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True,
                             vision_depth=6, vision_hidden_size=48, vision_heads=3, fullatt_block_indexes=(2, 5),
                             num_hidden_layers=3, shards=3, seed=1),
    # Qwen2-VL: LayerNorm, fc1/fc2 MLP, no windows, frame-index video positions; untied, and tied over shards
    "qwen2_vl": TinySpec(family="qwen2-vl", seed=2),
    "qwen2_vl_sharded": TinySpec(family="qwen2-vl", hidden_size=96, num_attention_heads=6, num_key_value_heads=1,
                                 tie_word_embeddings=True, vision_depth=3, vision_hidden_size=48, vision_heads=3,
                                 num_hidden_layers=3, shards=2, seed=3),
    # Qwen3-VL: head_dim apart from hidden/heads, q/k norm, interleaved M-RoPE, DeepStack into 2 and 3 layers,
    # learned position grid, per-frame video timestamps; untied, and tied over shards
    "qwen3_vl": TinySpec(family="qwen3-vl", head_dim=32, seed=8),
    "qwen3_vl_sharded": TinySpec(family="qwen3-vl", hidden_size=96, num_attention_heads=6, num_key_value_heads=1,
                                 tie_word_embeddings=True, vision_depth=5, vision_hidden_size=48, vision_heads=3,
                                 num_hidden_layers=3, deepstack_visual_indexes=(0, 2, 4), shards=2, seed=9),
}
# Quantized (`make-tiny --awq/--gptq`): the MLP width 96 is 3 groups of 32, which no even tensor-parallel size
# splits (vlserve pads); GPTQ symmetric with tied embeddings beside it
QUANTIZED_SPECS = {
    "tiny_awq": TinySpec(awq_group=32, intermediate_size=96, seed=4),
    "tiny_gptq": TinySpec(gptq_group=32, intermediate_size=96, seed=5),
    "tiny_gptq_sym": TinySpec(gptq_group=32, gptq_sym=True, tie_word_embeddings=True, seed=6),
}


def checkpoint_fixture(name: str, spec: TinySpec):
    """A session fixture `<name>_ckpt`: the checkpoint of `spec`, written once."""
    @pytest.fixture(scope="session", name=f"{name}_ckpt")
    def checkpoint(tmp_path_factory):
        return make_tiny(tmp_path_factory.mktemp(name), spec)
    return checkpoint


for _name, _spec in {**SPECS, **QUANTIZED_SPECS}.items():
    globals()[f"{_name}_ckpt"] = checkpoint_fixture(_name, _spec)


@pytest.fixture(scope="session", params=sorted(SPECS))
def any_ckpt(request):
    """Runs a test once per checkpoint shape."""
    return request.getfixturevalue(f"{request.param}_ckpt")


@pytest.fixture(scope="session")
def device():
    """Where our side of the equality tests runs: cpu in CI; VLSERVE_TEST_DEVICE=cuda on a GPU machine."""
    return os.environ.get("VLSERVE_TEST_DEVICE", "cpu")
