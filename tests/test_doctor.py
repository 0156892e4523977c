"""`vlserve doctor` on this machine (no GPU in CI: the GPU checks run on the H100, see docs/benchmarks.md), its
decisions on arch lists, /dev/shm, interface variables and version skew, and across a real (local) Ray cluster."""

import os

import pytest

from vlserve.cli import main
from vlserve.distributed.cluster import NodeFacts
from vlserve.plan.cards import find_card
from vlserve.plan.checks import kernel_image
from vlserve.plan.doctor import NodeReport, interface_selected, shared_memory, skew


def doctor(capsys, *argv: str) -> tuple[int, str]:
    code = main(["doctor", *argv])
    return code, capsys.readouterr().out


@pytest.fixture
def no_interface_env(monkeypatch):
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)


def test_this_machine(capsys, tiny_ckpt, no_interface_env):
    code, out = doctor(capsys, str(tiny_ckpt), "--head", "127.0.0.1:6379")
    assert code == 0, out
    assert "no NVIDIA GPU visible: vlserve runs on the CPU" in out
    assert "/dev/shm" in out and "ok   model folder" in out
    assert "ok   route to head: 127.0.0.1:6379 is reached through lo (127.0.0.1)" in out


def test_missing_model_folder_is_fatal(capsys, tmp_path):
    code, out = doctor(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and "FAIL model folder" in out and "copy the checkpoint folder" in out


def test_interface_variables_that_miss_the_route_are_fatal(capsys, monkeypatch, no_interface_env):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "bogus0")
    code, out = doctor(capsys, "--head", "127.0.0.1:6379")
    assert code == 2
    assert "GLOO_SOCKET_IFNAME=bogus0 does not select lo" in out and "fix: export GLOO_SOCKET_IFNAME=lo" in out
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "=lo")
    code, out = doctor(capsys, "--head", "127.0.0.1:6379")
    assert code == 0 and 'NCCL_SOCKET_IFNAME="=lo" selects lo' in out and "==lo" not in out


def test_bad_head_address_is_fatal(capsys):
    code, out = doctor(capsys, "--head", "10.0.0.1")
    assert code == 2 and "needs a port" in out


def test_nccl_and_gloo_match_interfaces_as_they_do():
    assert interface_selected("NCCL_SOCKET_IFNAME", "eth", "eth1")  # NCCL: prefix
    assert not interface_selected("NCCL_SOCKET_IFNAME", "=eth", "eth1")  # '=': exact
    assert not interface_selected("NCCL_SOCKET_IFNAME", "^docker,lo", "lo")  # '^': all but
    assert interface_selected("NCCL_SOCKET_IFNAME", "^docker,lo", "ens5")
    assert not interface_selected("GLOO_SOCKET_IFNAME", "eth", "eth1")  # Gloo: exact names
    assert interface_selected("GLOO_SOCKET_IFNAME", "ens5,eth1", "eth1")


@pytest.mark.parametrize("card, arch, runs", [
    ("RTX2080Ti", ["sm_80", "sm_86", "sm_90"], False),  # a build without Turing: "no kernel image"
    ("RTX2080Ti", ["sm_75", "sm_80"], True),
    ("A10", ["sm_80"], True),  # sm_80 code runs on 8.6
    ("L4", ["sm_90a"], False),  # 'a' code runs only on exactly 9.0
    ("H100", ["sm_90a"], True),
    ("RTX5090", ["sm_90", "compute_90"], True),  # PTX the driver compiles for 12.0
    ("V100-32GB", ["sm_75", "compute_75"], False),  # PTX of a newer architecture does not run on 7.0
])
def test_arch_list_against_the_card(card, arch, runs):
    problem = kernel_image(find_card(card), arch)
    assert (problem is None) == runs
    if problem:
        assert "no kernel image is available for execution on the device" in problem.message


def test_small_shared_memory():
    docker_default = os.statvfs_result((4096, 4096, 16384, 16384, 16384, 0, 0, 0, 0, 255, 0))  # 64 MiB
    one_gpu, eight = shared_memory(docker_default, 1), shared_memory(docker_default, 8)
    assert not one_gpu.ok and not one_gpu.fatal and "--shm-size" in one_gpu.fix
    assert eight.fatal
    assert shared_memory(os.statvfs_result((4096, 4096, 2**20, 0, 0, 0, 0, 0, 0, 255, 0)), 8).ok  # 4 GiB


def test_version_skew_and_model_files():
    mine = NodeFacts("a", "3.12.3", "0.1.0", "2.11.0", {"config.json": (10, "ab")})
    same = NodeReport("10.0.0.2 (b)", facts=NodeFacts("b", "3.12.3", "0.1.0", "2.11.0", {"config.json": (10, "ab")}))
    older = NodeReport("10.0.0.3 (c)", facts=NodeFacts("c", "3.12.3", "0.1.0", "2.9.1", {"config.json": (10, "ab")}))
    other = NodeReport("10.0.0.4 (d)", facts=NodeFacts("d", "3.12.3", "0.1.0", "2.11.0", {"config.json": (11, "cd")}))
    found = skew(mine, [same, older, other], "/models/7b")
    assert [f.check for f in found] == ["node 10.0.0.3 (c)", "node 10.0.0.4 (d)"]
    assert "runs torch 2.9.1, this node 2.11.0" in found[0].detail and "same versions" in found[0].fix
    assert "different model files in /models/7b: config.json" in found[1].detail
    assert skew(mine, [same], "/models/7b")[0].ok


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_doctor_and_plan_across_a_ray_cluster(capsys, tiny_ckpt, local_ray, no_interface_env):
    code, out = doctor(capsys, str(tiny_ckpt), "--cluster", "ray")
    assert code == 0, out
    assert "across nodes:" in out and "one node, this one: nothing to compare" in out and "1 nodes" not in out
    assert main(["plan", str(tiny_ckpt), "--cluster", "ray"]) == 0
    out = capsys.readouterr().out
    assert "hardware: Ray cluster: " in out and "FEASIBLE" in out
