"""Tensor and pipeline parallel over spawned processes (Gloo on CPU): the same greedy tokens as one process; a
dead worker fails requests instead of hanging; sizes that do not split the model are refused before loading."""

import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hf_reference import image_url, text
from vlserve import LLM, SamplingParams
from vlserve.config import ModelConfig, stage_layers, valid_tensor_parallel_sizes
from vlserve.distributed.executor import balanced_owners
from vlserve.distributed.packed_step import pack, unpack
from vlserve.engine.model_runner import StepInput
from vlserve.errors import ConfigError, EngineDeadError
from vlserve.engine.sampling_params import StructuredOutputsParams
from vlserve.model.layers.attention import AttentionMetadata

CONVERSATIONS = [  # three new images in the first step: with -tp 2 the ranks share the vision work
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "user", "content": [image_url(224, 168, 7), text("What is in this picture?")]}],
    [{"role": "user", "content": [image_url(112, 84, 1), text("and"), image_url(56, 140, 2), text("Compare.")]}],
]
GREEDY = SamplingParams(temperature=0, max_tokens=8)
# Prompt logprobs (logits of every prompt row, from the last stage) and a grammar (masks on rank 0) ride along
PARAMS = [SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=2), GREEDY,
          SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(
              choice=["left", "right", "both"]))]


def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)]


def results(llm):
    outs = llm.chat(CONVERSATIONS, PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [lp.logprob for lp in outs[0].prompt_logprobs[1:]]


@pytest.mark.parametrize("fixture, tp, pp", [("tiny_ckpt", 2, 1), ("tiny_sharded_ckpt", 2, 1),
                                             ("tiny_ckpt", 1, 2), ("tiny_sharded_ckpt", 1, 3),
                                             ("tiny_sharded_ckpt", 2, 2), ("qwen2_vl_ckpt", 2, 1),
                                             ("qwen2_vl_sharded_ckpt", 1, 2), ("qwen3_vl_ckpt", 2, 1),
                                             ("qwen3_vl_sharded_ckpt", 1, 2)])
def test_parallel_equals_one_process(request, fixture, tp, pp, device):
    """tiny_sharded has tied embeddings (the last stage loads the shared matrix) and 3 layers over 2 stages;
    qwen3_vl_sharded's third DeepStack feature goes to its layer 2, on the second stage.
    With VLSERVE_TEST_DEVICE=cuda: NCCL, one GPU per rank."""
    if device.startswith("cuda") and tp * pp > torch.cuda.device_count():
        pytest.skip(f"needs {tp * pp} GPUs, this machine has {torch.cuda.device_count()}")
    ckpt = request.getfixturevalue(fixture)
    kwargs = dict(device=device, progress=False, num_gpu_blocks_override=256)
    alone = LLM(str(ckpt), **kwargs)
    expected, (expected_extras, expected_scores) = tokens(alone), results(alone)
    alone.shutdown()  # its memory back before the ranks start (the plan counts what is free)
    llm = LLM(str(ckpt), tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)
    engine, depths = llm.core, []
    complete = engine.complete
    engine.complete = lambda batch: depths.append(len(engine.in_flight) + 1) or complete(batch)
    try:
        assert tokens(llm) == expected
        # one batch per stage in flight: the 3 conversations split over the stages (measured on plain requests: a
        # grammar's compile delays its request by a varying number of steps)
        assert max(depths) == pp
        got, scores = results(llm)
        assert got == expected_extras
        assert llm.tokenizer.decode(got[2], skip_special_tokens=True) in ("left", "right", "both")
        assert scores == pytest.approx(expected_scores, abs=1e-4)
        bm = llm.core.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        llm.core.shutdown()


def test_invalid_sizes_say_what_works(tiny_ckpt):
    cfg = ModelConfig.from_dir(tiny_ckpt)  # 4 heads, 2 KV heads, MLP 128, 2 layers
    assert valid_tensor_parallel_sizes(cfg, up_to=8) == [1, 2, 4]
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size 3 .* valid sizes: 1, 2, 4"):
        LLM(str(tiny_ckpt), device="cpu", progress=False, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match=r"--pipeline-parallel-size 3 exceeds the model's 2 layers"):
        LLM(str(tiny_ckpt), device="cpu", progress=False, pipeline_parallel_size=3)


def test_images_are_spread_by_patch_count():
    assert balanced_owners([100, 10, 60, 50], 2) == [0, 0, 1, 1]  # 100 + 10 vs 60 + 50
    assert sorted(balanced_owners([5, 5, 5], 3)) == [0, 1, 2]


def test_stage_layers_split_evenly_unless_told():
    assert [list(stage_layers(80, 3, s)) for s in range(3)] == [list(range(0, 27)), list(range(27, 54)),
                                                                 list(range(54, 80))]
    assert [len(stage_layers(28, 8, s)) for s in range(8)] == [4, 4, 4, 4, 3, 3, 3, 3]
    assert [list(stage_layers(28, 3, s, (10, 10, 8))) for s in range(3)] == [list(range(0, 10)),
                                                                             list(range(10, 20)), list(range(20, 28))]


def test_layer_partition(tiny_sharded_ckpt):
    """3 layers as 1 + 2 instead of the even 2 + 1: the same tokens; partitions that do not fit are refused."""
    kwargs = dict(device="cpu", progress=False, num_gpu_blocks_override=256)
    expected = tokens(LLM(str(tiny_sharded_ckpt), **kwargs))
    llm = LLM(str(tiny_sharded_ckpt), pipeline_parallel_size=2, pp_layer_partition=(1, 2), **kwargs)
    try:
        assert list(llm.core.runner.runner.model.model.layer_ids) == [0]
        assert tokens(llm) == expected
    finally:
        llm.core.shutdown()
    with pytest.raises(ConfigError, match="--pp-layer-partition 2,2 places 4 layers, the model has 3"):
        LLM(str(tiny_sharded_ckpt), pipeline_parallel_size=2, pp_layer_partition=(2, 2), **kwargs)
    with pytest.raises(ConfigError, match="--pp-layer-partition 3 must give each of the 2 stages"):
        LLM(str(tiny_sharded_ckpt), pipeline_parallel_size=2, pp_layer_partition=(3,), **kwargs)


def test_dead_worker_fails_the_step(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=2)
    engine = llm.core
    try:
        engine.add(llm.prompt_request("a long story", SamplingParams(max_tokens=100, ignore_eos=True)))
        engine.step()
        os.kill(engine.runner.workers[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises((EngineDeadError, RuntimeError)):
            for _ in range(100):
                engine.step()
        assert time.monotonic() - start < 10
    finally:
        engine.shutdown()


def test_engines_one_after_another_in_one_process(tiny_ckpt):
    """A notebook or a sweep makes engines in turn: tp 1, then tp 2 left through `with`, then tp 2 simply dropped.
    Each gives back its workers and process group, so the next starts, and all answer alike."""
    kwargs = dict(progress=False, num_gpu_blocks_override=256)
    llm = LLM(str(tiny_ckpt), **kwargs)
    expected = tokens(llm)
    llm.shutdown()
    llm.shutdown()  # a second call does nothing
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.generate("hello")
    with LLM(str(tiny_ckpt), tensor_parallel_size=2, **kwargs) as llm:
        workers = llm.core.runner.workers
        assert tokens(llm) == expected
    assert not dist.is_initialized() and not any(w.is_alive() for w in workers)
    llm = LLM(str(tiny_ckpt), tensor_parallel_size=2, **kwargs)
    workers = llm.core.runner.workers
    assert tokens(llm) == expected
    del llm  # no shutdown(): garbage collection releases it
    assert not dist.is_initialized() and not any(w.is_alive() for w in workers)


def test_shutdown_frees_the_model(tiny_ckpt, device):
    """Weights, KV cache and (on CUDA) graphs go with shutdown, while the LLM object itself may live on."""
    allocated = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    llm = LLM(str(tiny_ckpt), device=device, progress=False, num_gpu_blocks_override=256)
    model = weakref.ref(llm.core.runner.model)
    assert tokens(llm)
    llm.shutdown()
    assert model() is None
    if device.startswith("cuda"):
        assert torch.cuda.memory_allocated() == allocated


def test_shutdown_after_a_failed_step_does_not_hang(tiny_ckpt):
    """Rank 0 fails mid-step while the other rank waits inside the model's all-reduce: shutting down must stop
    that rank, not send it a message it can no longer receive."""
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=2)
    engine = llm.core

    def failing_run(step):
        raise RuntimeError("simulated failure on rank 0")

    engine.runner.runner.launch = failing_run
    engine.add(llm.prompt_request("hello", SamplingParams(max_tokens=4)))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    workers, start = engine.runner.workers, time.monotonic()
    engine.shutdown()
    assert time.monotonic() - start < 15 and not any(w.is_alive() for w in workers)


def test_mp_executor_with_one_rank_matches_local(tiny_ckpt, device):
    """`mp` at TP=1 still sets up the process group (NCCL on a GPU, Gloo here) and runs the step through it."""
    kwargs = dict(device=device, progress=False, kv_cache_memory_gib=0.1, num_gpu_blocks_override=64)
    expected = tokens(LLM(str(tiny_ckpt), distributed_executor_backend="local", **kwargs))
    llm = LLM(str(tiny_ckpt), distributed_executor_backend="mp", **kwargs)
    try:
        assert dist.get_backend() == ("nccl" if device.startswith("cuda") else "gloo")
        assert tokens(llm) == expected
    finally:
        llm.core.shutdown()


def test_abort_while_in_flight_frees_everything(tiny_ckpt):
    """Pipeline parallel: a request aborted while its batch is still in the pipeline is dropped when the batch
    comes back; the others finish and no KV block leaks."""
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, num_gpu_blocks_override=64, pipeline_parallel_size=2)
    engine = llm.core
    try:
        for name in ("a", "b", "c"):
            engine.add(llm.inputs.prompt(name, f"story {name}", SamplingParams(max_tokens=6, ignore_eos=True)))
        engine.step()  # the first batch goes in flight
        assert engine.in_flight and any(s.in_flight for s in engine.scheduler.running)
        aborted = next(s.request_id for s in engine.scheduler.running if s.in_flight)
        engine.abort(aborted)
        finished = {}
        for _ in range(100):
            for out in engine.step():
                if out.finish_reason:
                    finished[out.request_id] = out
            if not engine.has_unfinished():
                break
        assert set(finished) == {"a", "b", "c"} - {aborted}
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        engine.shutdown()


def packed_round_trip(step):
    header, buffer = pack(step)
    assert header.buffer_len() == len(buffer) and buffer.dtype == torch.int32
    got = unpack(header, buffer.clone(), step.media_embeds)
    for name in ("input_ids", "positions", "media_rows", "logit_rows"):
        a, b = getattr(step, name), getattr(got, name)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
    for name in ("cu_seqlens", "context_lens", "block_tables", "slot_mapping", "max_seqlen", "max_context_len",
                 "has_prefix"):
        a, b = getattr(step.meta, name), getattr(got.meta, name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
    assert got.is_decode == step.is_decode


def test_a_step_travels_packed_as_int32():
    """What the other ranks receive (packed_step.py) is the step rank 0 built: a prefill with media and 3-row
    positions beside a cached prefix, and a decode step."""
    lengths, context = np.array([5, 3]), np.array([5, 19])
    tables = np.array([[7, 0], [2, 9]])
    meta = AttentionMetadata.paged(lengths, context, tables, np.arange(100, 108))
    prefill = StepInput(torch.arange(8), torch.arange(24).view(3, 8), meta, torch.randn(2, 16),
                        torch.tensor([1, 2]), torch.tensor([4, 7]))
    packed_round_trip(prefill)
    meta = AttentionMetadata.paged(np.array([1, 1, 1]), np.array([4, 40, 17]), np.arange(9).reshape(3, 3),
                                   np.array([3, 39, 16]))
    packed_round_trip(StepInput(torch.tensor([11, 12, 13]), torch.tensor([3, 41, 16]), meta, None, None,
                                torch.tensor([0, 1, 2])))


def test_step_broadcast_benchmark_times_both_forms(tmp_path):
    """benchmarks/step_broadcast.py's smoke run: both cases, both forms timed (the worker unpacks every step)."""
    out = tmp_path / "result.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_broadcast.py"
    subprocess.run([sys.executable, str(script), "--seqs", "4", "--steps", "3", "--json", str(out)], check=True,
                   timeout=120, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["pickled_ms"] > 0 and r["packed_ms"] > 0 for r in rows)


def test_a_malformed_media_step_reaches_every_rank_as_it_is():
    """Embeddings whose rows disagree with the media pad rows: the workers receive both at their own sizes (the
    model on every rank then refuses the step alike), never a broadcast of mismatched sizes."""
    meta = AttentionMetadata.paged(np.array([4]), np.array([4]), np.array([[1]]), np.arange(16, 20))
    step = StepInput(torch.arange(4), torch.arange(12).view(3, 4), meta, torch.randn(2, 8), torch.tensor([0, 1, 2]),
                     torch.tensor([3]))
    header, buffer = pack(step)
    assert (header.media_rows, header.media_embed_rows, header.media_width) == (3, 2, 8)
    got = unpack(header, buffer, step.media_embeds)
    assert got.media_rows.tolist() == [0, 1, 2]
    huge = AttentionMetadata.paged(np.array([1]), np.array([1]), np.array([[2**27]]), np.array([2**31]))
    with pytest.raises(ValueError, match="does not fit"):
        pack(StepInput(torch.tensor([5]), torch.tensor([0]), huge, None, None, torch.tensor([0])))


def test_a_script_on_standard_input_starts_ranks(tiny_ckpt, tmp_path):
    """Ranks start through their own entry point: a script fed on stdin, without a __main__ guard, runs -tp 2 (a
    multiprocessing spawn would re-import `<stdin>` and the ranks would die)."""
    script = (f"from vlserve import LLM, SamplingParams\n"
              f"llm = LLM({str(tiny_ckpt)!r}, device='cpu', progress=False, kv_cache_memory_gib=0.1, "
              f"tensor_parallel_size=2)\n"
              f"out = llm.generate(['hello'], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)\n"
              f"print('TOKENS', len(out[0].outputs[0].token_ids))\n")
    done = subprocess.run([sys.executable, "-"], input=script, text=True, capture_output=True, timeout=240,
                          cwd=tmp_path)
    assert done.returncode == 0 and "TOKENS 3" in done.stdout, done.stderr[-2000:]


def test_a_rank_that_dies_while_starting_fails_the_start_at_once(tiny_ckpt, tmp_path, monkeypatch):
    """Its exit and last lines are in the error, long before the rendezvous timeout."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nsys.stderr.write('simulated: this rank cannot start\\n')\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="exited while starting .*simulated: this rank cannot start"):
        LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=2)
    assert time.monotonic() - start < 60



# sitecustomize for a rank that dies as the groups form (the first dist.new_group), after it joined the store; it
# writes the time of its death to $VLS_DEATH_FILE. An audit hook on imports patches torch.distributed once it is in.
DIES_AS_GROUPS_FORM = """
import os, sys, time

def _hook(event, args):
    d = sys.modules.get("torch.distributed")
    if event == "import" and d is not None and hasattr(d, "new_group") and not hasattr(d, "_vls_dies"):
        d._vls_dies = True

        def new_group(*args, **kwargs):
            with open(os.environ["VLS_DEATH_FILE"], "w") as f:
                f.write(repr(time.time()))
            sys.stderr.write("simulated: died as the groups form\\n")
            sys.stderr.flush()
            os._exit(9)
        d.new_group = new_group

if os.environ.get("VLS_DEATH_FILE"):
    sys.addaudithook(_hook)
"""


def dying_rank_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH and the variable that make spawned ranks (or a Ray node's workers) die as the groups form."""
    (tmp_path / "sitecustomize.py").write_text(DIES_AS_GROUPS_FORM)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "VLS_DEATH_FILE": str(tmp_path / "died")}


def seconds_since_death(tmp_path: Path) -> float:
    return time.time() - float((tmp_path / "died").read_text())


def test_a_rank_that_dies_as_the_groups_form_fails_the_start_within_seconds(tiny_ckpt, tmp_path, monkeypatch):
    """Rank 0 would wait on it in the first collective until the distributed timeout (new_group's own default: 30
    minutes); it watches the ranks instead, and the next engine in the process starts as if nothing happened."""
    for key, value in dying_rank_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(EngineDeadError, match="exited .*simulated: died as the groups form"):
        LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=2)
    assert seconds_since_death(tmp_path) < 10
    monkeypatch.delenv("VLS_DEATH_FILE")
    llm = LLM(str(tiny_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=2)
    assert len(llm.generate(["hi"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == GREEDY.max_tokens
    llm.shutdown()
