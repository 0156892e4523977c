"""Vision tower in weights mode (--mm-encoder-tp-mode weights): heads, MLPs and the merger's MLP split over the
tensor-parallel ranks, which run it together. The same embeddings and greedy tokens as one process; each rank holds
only its slice; sizes that do not split the tower are refused before loading."""

import argparse

import pytest
import torch
from hf_reference import text, video_url
from safetensors import safe_open
from test_distributed import CONVERSATIONS, GREEDY

from vlserve import LLM
from vlserve.args import add_engine_args, engine_config
from vlserve.config import EngineConfig, ModelConfig, VisionConfig, valid_vision_tensor_parallel_sizes
from vlserve.distributed.parallel_state import TensorParallelGroup, reset, set_tp_group
from vlserve.errors import ConfigError
from vlserve.model.loader import load_model

WITH_VIDEO = CONVERSATIONS + [[{"role": "user", "content": [video_url(112, 84, 8, 4.0), text("What happens?")]}]]


def run(llm) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """Greedy tokens of every conversation, and the embeddings the vision tower produced (by content hash)."""
    outputs = llm.chat(WITH_VIDEO, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], dict(llm.core.runner.vision_cache.entries)


@pytest.fixture(scope="module")
def one_process(request):
    """The one-process results of each checkpoint, computed once."""
    results = {}

    def of(name: str):
        if name not in results:
            ckpt = request.getfixturevalue(f"{name}_ckpt")
            results[name] = run(LLM(str(ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.1))
        return results[name]
    return of


@pytest.mark.parametrize("name, tp, pp", [("tiny", 2, 1), ("tiny", 2, 2), ("qwen3_vl", 2, 1)])
def test_weights_mode_equals_one_process(request, one_process, name, tp, pp):
    """With two stages the second holds no tower and skips the vision step. Qwen3-VL: its DeepStack mergers split
    too (their output in each embedding row)."""
    expected = one_process(name)
    llm = LLM(str(request.getfixturevalue(f"{name}_ckpt")), device="cpu", progress=False, kv_cache_memory_gib=0.1,
              tensor_parallel_size=tp, pipeline_parallel_size=pp, mm_encoder_tp_mode="weights")
    try:
        assert llm.core.runner.runner.model.visual.blocks[0].attn.heads == 2  # 4 heads split over 2 ranks
        tokens, embeds = run(llm)
        assert tokens == expected[0]
        assert embeds.keys() == expected[1].keys() and len(embeds) == 4  # 3 images and the video
        for key, value in expected[1].items():
            torch.testing.assert_close(embeds[key], value, rtol=1e-5, atol=1e-5)
        bm = llm.core.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        llm.core.shutdown()


def expected_slice(f, name: str, rank: int) -> torch.Tensor:
    """Rank `rank` of 2's part of a vision tensor, cut from the checkpoint tensor by what each layer splits."""
    if ".attn.qkv." in name:  # fused [q; k; v]: each part split by heads
        return torch.cat([part.chunk(2)[rank] for part in f.get_tensor(name).chunk(3)])
    if ".gate_up_proj." in name:
        gate, up = (f.get_tensor(name.replace("gate_up_proj", p)) for p in ("gate_proj", "up_proj"))
        return torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]])
    if name.endswith(("attn.proj.weight", "down_proj.weight", "merger.mlp.2.weight")):  # row parallel: columns
        return f.get_tensor(name).chunk(2, dim=1)[rank]
    if ".merger.mlp.0." in name:
        return f.get_tensor(name).chunk(2)[rank]
    if ".patch_embed." in name:  # a Conv3d in the checkpoint, a linear map here; whole on every rank
        return f.get_tensor(name).flatten(1)
    return f.get_tensor(name)  # norms and the biases of row-parallel layers: whole


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_holds_only_its_slice(tiny_ckpt, rank):
    set_tp_group(TensorParallelGroup(rank, 2, None))  # loading needs no collectives
    try:
        model = load_model(ModelConfig.from_dir(tiny_ckpt), torch.float32, "cpu", progress=False,
                           vision_tp_mode="weights")
    finally:
        reset()
    with safe_open(str(tiny_ckpt / "model.safetensors"), framework="pt") as f:
        for name, param in model.visual.named_parameters():
            torch.testing.assert_close(param, expected_slice(f, f"visual.{name}", rank), rtol=0, atol=0)


def test_tower_that_does_not_split_is_refused_before_loading(tiny_sharded_ckpt):
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size 2 does not split the vision tower \(3 heads, MLP "
                                          r"width 96\) .* sizes that split it: 1, 3; or use --mm-encoder-tp-mode data"):
        LLM(str(tiny_sharded_ckpt), device="cpu", progress=False, tensor_parallel_size=2,
            mm_encoder_tp_mode="weights")


@pytest.mark.parametrize("mlp, sizes", [(3420, [1, 2, 4]), (3456, [1, 2, 4, 8, 16])])
def test_qwen25_vl_towers_split_over(mlp, sizes):
    """Every Qwen2.5-VL tower has 16 heads; 3B/7B have MLP width 3420, 32B/72B 3456."""
    tower = VisionConfig(depth=32, hidden_size=1280, intermediate_size=mlp, num_heads=16, out_hidden_size=3584,
                         fullatt_block_indexes=(7, 15, 23, 31))
    assert valid_vision_tensor_parallel_sizes(tower, up_to=16) == sizes


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return parser.parse_args(list(flags))


def test_flag_parses_and_bad_values_are_refused(capsys):
    assert engine_config(parse(), "m").mm_encoder_tp_mode == "data"
    assert engine_config(parse("--mm-encoder-tp-mode", "weights"), "m").mm_encoder_tp_mode == "weights"
    with pytest.raises(SystemExit):
        parse("--mm-encoder-tp-mode", "heads")
    assert "invalid choice: 'heads'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--mm-encoder-tp-mode 'heads' must be data or weights"):
        EngineConfig(model="m", mm_encoder_tp_mode="heads")
