"""4-bit checkpoints, AWQ (AutoAWQ's GEMM format) and GPTQ (no act-order, symmetric or not), written by make-tiny
--awq / --gptq: the formats, greedy tokens equal to transformers run on the exactly dequantized weights, tensor
parallel over an MLP whose groups do not split (padded at load)."""

import pytest
import torch

from hf_reference import chat_prompt, dequantized_copy, hf_inputs, hf_model, image_url, text
from vlserve import LLM, SamplingParams
from vlserve.config import ModelConfig
from vlserve.errors import CheckpointError
from vlserve.model.layers import gptq
from vlserve.model.layers.awq import AWQ_ORDER, dequantize, pack, quantize, unpack
from vlserve.model.quantization import mlp_width

CHATS = [
    [{"role": "user", "content": "Say something about four-bit weights."}],
    [{"role": "user", "content": [image_url(112, 84, 3), text("What is in this picture?")]}],
    [{"role": "user", "content": [image_url(84, 112, 4), text("Describe it.")]},
     {"role": "assistant", "content": "A gradient."}, {"role": "user", "content": "And the colours?"}],
]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_packing_is_autoawqs():
    values = torch.arange(16, dtype=torch.int32).remainder(16).view(2, 8)
    packed = pack(values)
    for j, output in enumerate(AWQ_ORDER):  # nibble j holds output AWQ_ORDER[j]
        assert ((packed[0] >> (4 * j)) & 0xF).item() == values[0, output]
    assert torch.equal(unpack(packed), values)


def test_quantize_then_dequantize_is_within_half_a_step():
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    qweight, qzeros, scales = quantize(weight, 32)
    assert qweight.shape == (64, 6) and qzeros.shape == (2, 6) and scales.shape == (2, 48)
    back = dequantize(qweight, qzeros, scales.float()).t()
    step = scales.float().repeat_interleave(32, dim=0).t()
    assert ((back - weight).abs() <= step * 0.5 + step * 0.01 + 1e-3).all()


def test_gptq_packs_inputs_in_order_and_zeros_minus_one():
    values = torch.arange(16 * 3, dtype=torch.int32).remainder(16).view(16, 3)
    packed = gptq.pack_rows(values)
    assert packed.shape == (2, 3) and ((packed[0, 1] >> 4) & 0xF).item() == values[1, 1]  # input 1 in nibble 1
    assert torch.equal(gptq.unpack_rows(packed), values) and torch.equal(gptq.unpack_cols(gptq.pack_cols(values.t())),
                                                                       values.t())
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for sym in (False, True):
        qweight, qzeros, scales, g_idx = gptq.quantize(weight, 32, sym)
        assert qweight.shape == (8, 16) and qzeros.shape == (2, 2) and torch.equal(g_idx, torch.arange(64) // 32)
        back = gptq.dequantize(qweight, qzeros, scales.float(), zero_offset=1).t()
        step = scales.float().repeat_interleave(32, dim=0).t()
        assert ((back - weight).abs() <= step * 0.51 + 1e-3).all()
        if sym:  # stored minus one: 7
            assert (gptq.unpack_cols(qzeros) == 7).all()


@pytest.fixture(scope="module", params=["awq", "gptq", "gptq_sym"])
def quantized(request, tmp_path_factory):
    """(checkpoint, transformers on its dequantized weights)"""
    ckpt = request.getfixturevalue(f"tiny_{request.param}_ckpt")
    dense = dequantized_copy(ckpt, tmp_path_factory.mktemp("dense") / "dense")
    return ckpt, hf_model(dense, ModelConfig.from_dir(dense))


@torch.no_grad()
def test_greedy_tokens_equal_transformers_on_the_dequantized_weights(quantized, device):
    ckpt, reference = quantized
    llm = LLM(str(ckpt), device=device, dtype="float32", max_model_len=1024, progress=False)
    for chat, out in zip(CHATS, llm.chat(CHATS, GREEDY, use_tqdm=False)):
        prompt = chat_prompt(llm.inputs, chat)
        expected = reference.generate(**hf_inputs(prompt, llm.core.model_config), max_new_tokens=8, do_sample=False)
        assert out.outputs[0].token_ids == expected[0, len(prompt.token_ids):].tolist()
    llm.shutdown()


@pytest.mark.parametrize("fixture", ["tiny_awq_ckpt", "tiny_gptq_ckpt"])
def test_tensor_parallel_pads_an_mlp_of_odd_groups(request, fixture):
    ckpt = request.getfixturevalue(fixture)
    cfg = ModelConfig.from_dir(ckpt)
    assert (mlp_width(cfg, 1), mlp_width(cfg, 2)) == (96, 128)  # 3 groups -> 2 a rank
    kwargs = dict(max_model_len=1024, progress=False)
    alone = LLM(str(ckpt), **kwargs)
    expected = [o.outputs[0].token_ids for o in alone.chat(CHATS, GREEDY, use_tqdm=False)]
    alone.shutdown()
    llm = LLM(str(ckpt), tensor_parallel_size=2, **kwargs)
    try:
        assert [o.outputs[0].token_ids for o in llm.chat(CHATS, GREEDY, use_tqdm=False)] == expected
    finally:
        llm.shutdown()


def test_random_awq_weights_for_benchmarks(tiny_awq_ckpt):
    llm = LLM(str(tiny_awq_ckpt), load_format="dummy", max_model_len=256, progress=False)
    out = llm.generate(["hi"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    layer = llm.core.runner.model.model.layers["0"].mlp.down_proj
    assert torch.isfinite(layer.dense_weight()).all() and layer.dense_weight().abs().max() < 1
    llm.shutdown()


def test_gptq_act_order_is_refused_at_load(tiny_gptq_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(tiny_gptq_ckpt, tmp_path / "act_order")
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="act-order"):
        LLM(str(ckpt), max_model_len=256, progress=False)
