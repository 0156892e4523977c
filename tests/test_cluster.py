"""`vlserve cluster` pieces that need no running cluster: flag parsing, the executor choice, and how two nodes'
software and model files are compared (the Ray cluster itself is exercised in test_ray_cluster.py)."""

import shutil
import subprocess
import sys

import pytest
import torch

from vlserve.cli import main
from vlserve.config import EngineConfig
from vlserve.distributed import cluster
from vlserve.distributed.cluster import NodeFacts, describe_difference, model_fingerprint, node_facts
from vlserve.distributed.executor import choose_backend
from vlserve.errors import ClusterError, ConfigError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("gpus, message", [("0,x", "comma-separated card indexes"), ("1,1", "distinct"),
                                           ("-1", "distinct card indexes from 0"), ("", "comma-separated")])
def test_bad_gpu_lists_are_refused(gpus, message):
    with pytest.raises(ConfigError, match=f"--gpus .*{message}"):
        cluster.join("127.0.0.1:6379", cluster.StartOptions(gpus=gpus))


def test_unknown_interface_lists_the_real_ones(capsys):
    assert main(["cluster", "join", "127.0.0.1:6379", "--interface", "nope0"]) == 2
    err = capsys.readouterr().err
    assert "--interface 'nope0' is not on this machine (it has: lo" in err


def test_head_address_must_be_on_this_machine():
    with pytest.raises(ConfigError, match="--node-ip-address 192.0.2.77 is on no interface of this machine"):
        cluster.start_head(6379, "192.0.2.77", cluster.StartOptions())


@pytest.mark.parametrize("tp, pp, backend, device, expected", [
    (1, 1, None, CPU, "local"), (2, 1, None, CPU, "mp"), (1, 2, "ray", CPU, "ray"), (1, 1, "mp", CPU, "mp"),
    (2, 2, None, CUDA, "ray"),  # more ranks than this machine's GPUs (none here): across machines
])
def test_backend_choice(tp, pp, backend, device, expected):
    cfg = EngineConfig(model="m", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                       distributed_executor_backend=backend)
    assert choose_backend(cfg, device) == expected


def test_backend_refusals():
    with pytest.raises(ConfigError, match="backend local runs one process"):
        EngineConfig(model="m", tensor_parallel_size=2, distributed_executor_backend="local")
    with pytest.raises(ConfigError, match="must be one of local, mp, ray"):
        EngineConfig(model="m", distributed_executor_backend="uni")
    cfg = EngineConfig(model="m", tensor_parallel_size=2, distributed_executor_backend="mp")
    with pytest.raises(ConfigError, match=r"2 ranks, one GPU each, but this machine has \d+.*backend ray"):
        choose_backend(cfg, torch.device("cuda")) if torch.cuda.device_count() < 2 else pytest.skip("has 2 GPUs")


def test_serve_flag_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--distributed-executor-backend", "threads"])
    assert "invalid choice: 'threads' (choose from 'local', 'mp', 'ray')" in capsys.readouterr().err


def test_identical_nodes_do_not_differ(tiny_ckpt):
    assert describe_difference(node_facts(str(tiny_ckpt)), node_facts(str(tiny_ckpt)), str(tiny_ckpt)) == ""


def test_changed_model_file_is_named(tiny_ckpt, tmp_path):
    copy = shutil.copytree(tiny_ckpt, tmp_path / "copy")
    (copy / "generation_config.json").write_text('{"temperature": 0.7}')
    mine, theirs = node_facts(str(tiny_ckpt)), node_facts(str(copy))
    assert "different model files in /models/x: generation_config.json; copy" in describe_difference(
        mine, theirs, "/models/x")


def test_missing_model_folder_and_version_skew(tiny_ckpt, tmp_path):
    mine = node_facts(str(tiny_ckpt))
    missing = node_facts(str(tmp_path / "absent"))
    assert "cannot read" in missing.model_error
    assert "copy the model folder to the same path on every node" in describe_difference(mine, missing, "x")
    older = NodeFacts(**{**mine.__dict__, "torch": "2.4.0"})
    assert describe_difference(mine, older, "x").startswith(f"runs torch 2.4.0, this node {torch.__version__}")


def test_fingerprint_hashes_small_files_and_sizes_large_ones(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"x" * 100)
    monkeypatch.setattr(cluster, "HASHED_FILE_BYTES", 10)
    found = model_fingerprint(tmp_path)
    assert found["sub/model.safetensors"] == (100, "")
    assert found["config.json"][0] == 2 and len(found["config.json"][1]) == 64


def test_no_cluster_says_how_to_start_one(monkeypatch):
    pytest.importorskip("ray", reason="needs Ray")
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # and no cluster on this machine
    with pytest.raises(ClusterError, match="start one with `vlserve cluster head`"):
        cluster.connect()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")
def test_gpus_on_a_machine_without_any():
    with pytest.raises(ConfigError, match="--gpus 0: torch sees no GPU on this machine; leave --gpus out"):
        cluster.join("127.0.0.1:6379", cluster.StartOptions(gpus="0"))


def test_unreachable_head_fails_at_once(monkeypatch):
    from vlserve.distributed.executor import free_port

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # nobody listens there
    with pytest.raises(ClusterError, match=r"cannot reach the Ray head at 127\.0\.0\.1:\d+ \(RAY_ADDRESS\): "
                                           r"Connection refused; is `vlserve cluster head` running there"):
        cluster.connect()


def test_the_whole_command_line_parses_without_torch():
    """`vlserve --help` and `vlserve cluster ...` should not wait for torch, uvicorn or the engine to import."""
    code = ("import sys; from vlserve.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'uvicorn', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_rank0_card_index_follows_cuda_visible_devices(monkeypatch):
    """Ray names a card by its index on the node; this process may see the cards renumbered."""
    pytest.importorskip("ray", reason="needs Ray")
    from vlserve.distributed.ray_executor import local_index

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert local_index("3") == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3,4")
    assert local_index("3") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ClusterError, match="Ray gave rank 0 GPU 3, which this process cannot see"):
        local_index("3")
