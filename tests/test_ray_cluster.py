"""A real Ray cluster of two "machines": network namespaces joined by a veth pair with differently named ends and a
decoy default route on the worker, made with `vlserve cluster head` and `vlserve cluster join` as separate
processes. Tensor and pipeline parallel through Ray actors give the same greedy tokens as one process, with ranks on
both machines; a killed worker fails the step within 10 s and shutdown does not hang."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netns import HEAD_IP, HEAD_NIC, WORKER_IP, WORKER_NIC, two_nodes
from test_distributed import CONVERSATIONS, GREEDY
from vlserve import LLM

pytest.importorskip("ray", reason="needs Ray (pip install ray), as `vlserve cluster` does")

REPO = Path(__file__).resolve().parents[1]
HEAD_CPUS, WORKER_CPUS = 1, 3  # one rank per CPU slot: every layout below puts ranks on both machines
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


def vlserve(ns: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "vlserve.cli", *args], env=node_env(),
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLOO_", "NCCL_", "RAY_"))}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "RAY_ADDRESS": f"{HEAD_IP}:6379"}


@pytest.fixture(scope="module")
def cluster():
    with two_nodes("ray") as nodes:
        temp = [f"/tmp/vls-ray-{os.getpid()}-{role}" for role in ("h", "w")]  # short: Ray's socket paths live here
        try:
            head = vlserve(nodes.head, "cluster", "head", "--interface", HEAD_NIC, "--num-cpus", str(HEAD_CPUS),
                           "--temp-dir", temp[0])
            assert head.returncode == 0, head.stdout + head.stderr
            join = vlserve(nodes.worker, "cluster", "join", f"{HEAD_IP}:6379", "--num-cpus", str(WORKER_CPUS),
                           "--temp-dir", temp[1])
            assert join.returncode == 0, join.stdout + join.stderr
            yield nodes, head.stdout, join.stdout
        finally:
            vlserve(nodes.head, "cluster", "stop")  # what vlserve started on this host: both nodes' Ray here
            for path in temp:
                shutil.rmtree(path, ignore_errors=True)


def test_each_machine_uses_its_route_to_the_head(cluster):
    _, head, join = cluster
    assert f"head {HEAD_IP}:6379 on interface {HEAD_NIC}" in head
    assert f"vlserve cluster join {HEAD_IP}:6379" in head
    assert f"joining {HEAD_IP}:6379 from {WORKER_IP} on interface {WORKER_NIC}" in join  # not the decoy eth0


def test_status_lists_both_machines(cluster):
    nodes, _, _ = cluster
    status = vlserve(nodes.head, "cluster", "status")
    assert status.returncode == 0, status.stderr
    rows = status.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [HEAD_IP, WORKER_IP]
    assert [row.split()[2] for row in rows] == ["head", "worker"]
    assert "differs" not in status.stdout


DRIVER = """
import json, sys
from test_distributed import CONVERSATIONS, GREEDY
from vlserve import LLM
from vlserve.errors import ClusterError
def emit(result):  # one write that starts a fresh line: Ray's own messages share stdout and may end without one
    sys.stdout.write("\\n" + json.dumps(result) + "\\n")
    sys.stdout.flush()
try:  # more ranks than the cluster has slots: refused once no machine joins in time, before anything loads
    LLM(sys.argv[1], device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=2,
        pipeline_parallel_size=3, distributed_executor_backend="ray", distributed_timeout_s=2)
except ClusterError as e:
    emit({"too_big": str(e)})
for tp, pp in json.loads(sys.argv[2]):
    llm = LLM(sys.argv[1], device="cpu", progress=False, kv_cache_memory_gib=0.1, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, distributed_executor_backend="ray")
    outputs = llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    bm = llm.core.block_manager
    emit({"tokens": [o.outputs[0].token_ids for o in outputs], "leaked": bm.num_blocks - bm.num_free_blocks,
          "nodes": sorted({w.name.split(" on ")[1] for w in llm.core.runner.workers})})
    llm.core.shutdown()
"""


def test_ray_parallel_equals_one_process(cluster, tiny_sharded_ckpt):
    """tiny_sharded: tied embeddings, 3 layers, 6 heads over 1 KV head; three new images in the first step."""
    nodes, _, _ = cluster
    one = LLM(str(tiny_sharded_ckpt), device="cpu", progress=False, kv_cache_memory_gib=0.1)
    expected = [o.outputs[0].token_ids for o in one.chat(CONVERSATIONS, GREEDY, use_tqdm=False)]
    out = driver(nodes.head, DRIVER, str(tiny_sharded_ckpt), json.dumps(LAYOUTS))
    too_big, *results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "6 ranks need 6 CPUs with one on this machine (10.231.7.1); after 2 s the cluster has 10.231.7.1: 1, " \
           "10.231.7.2: 3" in too_big["too_big"]
    assert "vlserve cluster join" in too_big["too_big"]
    assert len(results) == len(LAYOUTS)
    for layout, result in zip(LAYOUTS, results):
        assert result["tokens"] == expected, layout
        assert result["leaked"] == 0
        assert WORKER_IP in result["nodes"], f"{layout}: no rank on the worker machine"


KILL = """
import json, sys, time
from vlserve import LLM, SamplingParams
def emit(result):  # one write that starts a fresh line: Ray's own messages share stdout and may end without one
    sys.stdout.write("\\n" + json.dumps(result) + "\\n")
    sys.stdout.flush()
llm = LLM(sys.argv[1], device="cpu", progress=False, kv_cache_memory_gib=0.1, pipeline_parallel_size=2,
          distributed_executor_backend="ray")
engine = llm.core
engine.add(llm.prompt_request("a long story", SamplingParams(max_tokens=100, ignore_eos=True)))
engine.step()
emit({"pid": engine.runner.workers[0].pid, "node": engine.runner.workers[0].name})
sys.stdin.readline()  # the test has killed the worker
start = time.monotonic()
try:
    for _ in range(1000):
        engine.step()
    emit({"error": None})
except Exception as e:
    emit({"error": type(e).__name__, "seconds": time.monotonic() - start})
start = time.monotonic()
engine.shutdown()
emit({"shutdown_seconds": time.monotonic() - start})
"""


def test_killed_worker_fails_the_step(cluster, tiny_ckpt):
    nodes, _, _ = cluster
    p = subprocess.Popen(["ip", "netns", "exec", nodes.head, sys.executable, "-c", KILL, str(tiny_ckpt)],
                         env=node_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        worker = next_json(p)
        assert worker.get("node", "").endswith(WORKER_IP), p.stderr.read() if p.poll() is not None else worker
        os.kill(worker["pid"], 9)  # the namespaces share one process table
        p.stdin.write("go\n")
        p.stdin.flush()
        failed, shut = next_json(p), next_json(p)
        assert "shutdown_seconds" in shut, (failed, p.communicate(timeout=30)[1][-3000:])
        assert failed["error"] in ("EngineDeadError", "RuntimeError", "DistBackendError") and failed["seconds"] < 10
        assert shut["shutdown_seconds"] < 15
    finally:
        p.kill()
        p.communicate()


def next_json(p: subprocess.Popen) -> dict:
    """The driver's next JSON line; Ray also prints its workers' deaths there."""
    for line in p.stdout:
        if line.startswith("{"):
            return json.loads(line)
    return {}


def driver(ns: str, code: str, *args: str) -> str:
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], env=node_env(),
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout
