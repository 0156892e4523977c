"""AWQ 4-bit checkpoints (AutoAWQ's GEMM format, written by make-tiny --awq): the format, greedy tokens equal to
transformers run on the exactly dequantized weights, tensor parallel over an MLP whose groups do not split (padded
at load), and the planner's padding note and bytes."""

import pytest
import torch

from hf_reference import chat_prompt, dequantized_copy, hf_inputs, hf_model, image_url, text
from vlserve import LLM, SamplingParams
from vlserve.config import ModelConfig
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


@pytest.fixture(scope="module")
def reference(tiny_awq_ckpt, tmp_path_factory):
    dense = dequantized_copy(tiny_awq_ckpt, tmp_path_factory.mktemp("awq_dense") / "dense")
    return hf_model(dense, ModelConfig.from_dir(dense))


@torch.no_grad()
def test_greedy_tokens_equal_transformers_on_the_dequantized_weights(tiny_awq_ckpt, reference, device):
    llm = LLM(str(tiny_awq_ckpt), device=device, dtype="float32", max_model_len=1024, progress=False)
    for chat, out in zip(CHATS, llm.chat(CHATS, GREEDY, use_tqdm=False)):
        prompt = chat_prompt(llm.inputs, chat)
        expected = reference.generate(**hf_inputs(prompt, llm.core.model_config), max_new_tokens=8, do_sample=False)
        assert out.outputs[0].token_ids == expected[0, len(prompt.token_ids):].tolist()
    llm.shutdown()


def test_tensor_parallel_pads_an_mlp_of_odd_groups(tiny_awq_ckpt):
    cfg = ModelConfig.from_dir(tiny_awq_ckpt)
    assert (cfg.intermediate_size, mlp_width(cfg, 1), mlp_width(cfg, 2)) == (96, 96, 128)  # 3 groups -> 2 a rank
    kwargs = dict(max_model_len=1024, progress=False)
    alone = LLM(str(tiny_awq_ckpt), **kwargs)
    expected = [o.outputs[0].token_ids for o in alone.chat(CHATS, GREEDY, use_tqdm=False)]
    alone.shutdown()
    llm = LLM(str(tiny_awq_ckpt), tensor_parallel_size=2, **kwargs)
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
