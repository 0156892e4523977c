"""`vlserve cluster` pieces that need no running cluster: flag parsing, the executor choice, and how two nodes'
software and model files are compared (the Ray cluster itself is exercised in test_ray_cluster.py)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

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


def test_join_without_a_head_fails_in_seconds(capsys):
    """Ray would retry an absent head for minutes; join checks that something answers first."""
    from vlserve.distributed.executor import free_port

    start = time.monotonic()
    assert main(["cluster", "join", f"127.0.0.1:{free_port()}"]) == 2
    assert time.monotonic() - start < 10
    assert re.search(r"cannot reach the Ray head at 127\.0\.0\.1:\d+ \(the head address\): Connection refused",
                     capsys.readouterr().err)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-m", "vlserve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_loopback_head_is_what_ray_advertises_and_binds():
    """--node-ip-address 127.0.0.1: Ray advertises 127.0.0.1 (not the machine's routable address), listens there
    only, a driver on this machine connects, and `cluster stop` stops it."""
    pytest.importorskip("ray", reason="needs Ray")
    from vlserve.distributed.executor import free_port
    from vlserve.distributed.network import route_interface

    port = free_port()
    try:
        head = cli("cluster", "head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1")
        assert head.returncode == 0, head.stdout + head.stderr
        assert f"head 127.0.0.1:{port} on interface lo: Ray listens on 127.0.0.1 only" in head.stdout
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        try:
            routable = route_interface("192.0.2.1").local_ip
        except ConfigError:
            routable = None  # no default route: nothing else to listen on
        if routable:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((routable, port), timeout=5)
        status = cli("cluster", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert [line.split()[2] for line in status.stdout.splitlines() if line.startswith("127.0.0.1 ")] == ["head"]
    finally:
        stop = cli("cluster", "stop")
    assert re.match(r"stopped \d+ Ray processes vlserve started on this machine", stop.stdout), stop.stdout
    assert cluster.started_processes() == {}
    status = cli("cluster", "status")  # Ray's record of the stopped head is gone with it: no wait on it
    assert status.returncode == 2 and "start one with `vlserve cluster head`" in status.stderr


def test_stop_leaves_a_ray_it_did_not_start(monkeypatch):
    pytest.importorskip("ray", reason="needs Ray")
    from vlserve.distributed.executor import free_port

    port = free_port()
    env = {**os.environ, **cluster.AUTH_MODE, **cluster.LOCAL_ONLY, "FOREIGN_RAY": f"127.0.0.1:{port}"}
    subprocess.run([*cluster.RAY_CLI, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=1", cluster.NO_DASHBOARD, "--disable-usage-stats"], env=env, capture_output=True,
                   timeout=120, check=True)
    try:
        stop = cli("cluster", "stop")
        assert stop.stdout.strip() == "no Ray process that vlserve started runs on this machine", stop.stdout
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # still serving
    finally:
        monkeypatch.setattr(cluster, "MARK", "FOREIGN_RAY")  # the same search, for the Ray this test started
        assert cluster.stop() > 0


RAY_DRIVER = """
import json, sys, time
from vlserve import LLM
try:
    LLM(sys.argv[1], device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=2,
        distributed_executor_backend="ray", distributed_timeout_s=120)
    print(json.dumps({"error": None}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e), "at": time.time()}))
"""


def test_a_ray_rank_that_dies_as_the_groups_form_fails_the_start_within_seconds(tiny_ckpt, tmp_path):
    """As with spawned ranks (test_distributed.py): rank 0 watches the Ray actors while the groups form."""
    pytest.importorskip("ray", reason="needs Ray")
    from test_distributed import dying_rank_env, seconds_since_death

    from vlserve.distributed.executor import free_port

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **dying_rank_env(tmp_path)}
    try:
        head = subprocess.run([sys.executable, "-m", "vlserve.cli", "cluster", "head", "--node-ip-address",
                               "127.0.0.1", "--port", str(port), "--num-cpus", "2"], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert head.returncode == 0, head.stdout + head.stderr
        driver = subprocess.run([sys.executable, "-c", RAY_DRIVER, str(tiny_ckpt)], capture_output=True, text=True,
                                timeout=300, check=False, env={k: v for k, v in os.environ.items()
                                                               if not k.startswith(("RAY_", "VLS_"))}
                                | {"RAY_ADDRESS": f"127.0.0.1:{port}"})
        result = json.loads(next(line for line in driver.stdout.splitlines()[::-1] if line.startswith("{")))
        assert result["error"] == "EngineDeadError", (result, driver.stderr[-3000:])
        assert "simulated: died as the groups form" in result["message"] or "exited" in result["message"]
        assert result["at"] - (time.time() - seconds_since_death(tmp_path)) < 10
    finally:
        cli("cluster", "stop")
