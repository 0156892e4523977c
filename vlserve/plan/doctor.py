"""`vlserve doctor`: what this machine (or every node of the Ray cluster) would trip over, checked live.

torch's CUDA arch list against each card (the "no kernel image" failure), a tiny Triton kernel compiled and run
on each card, driver and CUDA versions, fp16/bf16 support, /dev/shm, the interface that routes to the head and the
Gloo/NCCL interface variables, the model folder; across a cluster, version skew and model files that differ.
"""

import ctypes
import os
import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from vlserve.errors import VLServeError
from vlserve.plan.cards import Card
from vlserve.plan.checks import attention_backend, kernel_image
from vlserve.plan.inventory import has_nvidia_driver

MIN_SHM_BYTES = 1 << 30  # NCCL and PyTorch's shared-memory tensors; Docker's default is 64 MiB
# Oldest driver (CUDA driver API version) each CUDA major release runs on, with minor-version compatibility.
DRIVER_FOR_CUDA = {11: 11000, 12: 12000, 13: 13000}


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True  # when not ok: serving would fail (else it is a warning)


@dataclass
class NodeReport:
    node: str
    findings: list[Finding] = field(default_factory=list)
    facts: object = None  # cluster.NodeFacts: versions and model files, compared across nodes


def check_node(head: str | None = None, model: str | None = None) -> NodeReport:
    """Every check of this machine; what run_on_each_node runs on each node."""
    import torch

    report = NodeReport(platform.node())
    report.findings += software(torch)
    cards = []
    if torch.cuda.is_available():
        cards = [Card(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory,
                      torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    for index, card in enumerate(cards):
        report.findings += gpu(torch, index, card)
    report.findings.append(shared_memory(os.statvfs("/dev/shm"), len(cards)))
    if head:
        report.findings += network(head)
    if model:
        report.findings.append(model_folder(model))
    from vlserve.distributed.cluster import node_facts

    report.facts = node_facts(model)
    return report


def software(torch) -> list[Finding]:
    cuda = torch.version.cuda
    found = [Finding("versions", True, f"python {platform.python_version()}, torch {torch.__version__} "
                     f"(CUDA {cuda or 'none: a CPU build'})")]
    driver = nvidia_driver_version()
    if not has_nvidia_driver():
        found.append(Finding("GPU", True, "no NVIDIA GPU visible: vlserve runs on the CPU (float32)"))
        return found
    if cuda is None:
        found.append(Finding("GPU", False, f"the NVIDIA driver {driver} is loaded but torch {torch.__version__} is a "
                             "CPU build", "install a CUDA build of torch (pip install torch from the CUDA index "
                             "of pytorch.org)"))
        return found
    supports = cuda_driver_version()
    needed = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]), 0)
    if supports < needed:
        found.append(Finding("driver", False, f"driver {driver} supports CUDA up to {supports // 1000}."
                             f"{supports % 1000 // 10}, torch needs CUDA {cuda}", "update the NVIDIA driver, or "
                             f"install a torch build for CUDA {supports // 1000}.x"))
    else:
        found.append(Finding("driver", True, f"driver {driver} (CUDA {supports // 1000}.{supports % 1000 // 10}) runs "
                             f"torch's CUDA {cuda}"))
    if not torch.cuda.is_available():
        found.append(Finding("GPU", False, "torch cannot use the GPUs (torch.cuda.is_available() is False)",
                             "check CUDA_VISIBLE_DEVICES and that the container was started with the GPUs "
                             "(docker run --gpus all)"))
    return found


def cuda_driver_version() -> int:
    """The newest CUDA the driver runs (e.g. 13000 for 13.0), from libcuda itself; 0 if it cannot be asked."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version = ctypes.c_int(0)
    return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0


def nvidia_driver_version() -> str:
    try:
        words = Path("/proc/driver/nvidia/version").read_text().split()
    except OSError:
        return "unknown"
    return next((w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit()), "unknown")


def gpu(torch, index: int, card: Card) -> list[Finding]:
    name = f"GPU {index} {card.name}"
    arch = torch.cuda.get_arch_list()
    problem = kernel_image(card, arch)
    found = [Finding(f"{name} kernels", problem is None,
                     problem.message if problem else f"sm_{card.capability[0]}{card.capability[1]} is covered by "
                     f"torch's arch list ({' '.join(arch)})", problem.fix if problem else "")]
    found.append(Finding(f"{name} dtypes", True, "float16 and bfloat16" if card.bf16 else
                         "float16 only (no bfloat16 before compute capability 8.0): --dtype auto picks float16"))
    backend = attention_backend(card)
    if backend:
        found.append(Finding(f"{name} attention", True, backend.message))
    found.append(triton_probe(index, name))
    return found


def triton_probe(index: int, name: str) -> Finding:
    try:
        from vlserve.plan.triton_probe import add_on
    except ImportError as e:
        return Finding(f"{name} Triton", False, f"Triton does not import ({e})",
                       "install the triton version your torch was built with (pip install triton)")
    try:
        add_on(index)
    except Exception as e:  # noqa: BLE001 (any compiler or driver failure is the finding)
        return Finding(f"{name} Triton", False, f"a tiny Triton kernel failed: {type(e).__name__}: {e}",
                       "check that triton matches torch (pip show torch triton) and that the driver supports the "
                       "card; `vlserve serve --enforce-eager` avoids compiling")
    return Finding(f"{name} Triton", True, "a tiny kernel compiled and ran correctly")


def shared_memory(stat: os.statvfs_result, gpus: int) -> Finding:
    size = stat.f_frsize * stat.f_blocks
    if size >= MIN_SHM_BYTES:
        return Finding("/dev/shm", True, f"{size / 2**30:.1f} GiB")
    return Finding("/dev/shm", False, f"only {size / 2**20:.0f} MiB: NCCL and worker processes on one machine "
                   "share memory through it (\"unhandled system error\", bus errors)",
                   "start the container with --shm-size=16g (or --ipc=host)", fatal=gpus > 1)


def network(head: str) -> list[Finding]:
    """The interface this node reaches the head through, and whether Gloo/NCCL would bind to it."""
    from vlserve.distributed.network import interface_env, parse_head_address, route_interface

    try:
        nic = route_interface(*parse_head_address(head))
    except VLServeError as e:
        return [Finding("route to head", False, str(e), "fix the address or this node's routes")]
    found = [Finding("route to head", True, f"{head} is reached through {nic.name} ({nic.local_ip})")]
    for key, value in interface_env(nic).items():
        have = os.environ.get(key)
        if have is None:
            found.append(Finding(key, True, f"unset; `vlserve cluster join` sets {assignment(key, value)} for this "
                                 "node's workers"))
        elif not interface_selected(key, have, nic.name):
            found.append(Finding(key, False, f"{assignment(key, have)} does not select {nic.name}, the interface that "
                                 "routes to the head: this node's workers would join, then drop",
                                 f"export {assignment(key, value)} (or unset it and let `vlserve cluster join` set "
                                 "it)"))
        else:
            found.append(Finding(key, True, f"{assignment(key, have)} selects {nic.name}"))
    return found


def assignment(key: str, value: str) -> str:
    """KEY="VALUE" as a shell takes it; NCCL's '=name' (exactly that interface) in quotes, so it does not read as a
    typo (NCCL_SOCKET_IFNAME==lo)."""
    return f'{key}="{value}"' if value.startswith("=") else f"{key}={shlex.quote(value)}"


def interface_selected(key: str, value: str, name: str) -> bool:
    """Gloo matches names exactly; NCCL by prefix, exactly after '=', and '^' excludes."""
    if key.startswith("GLOO"):
        return name in value.split(",")
    if value.startswith("^"):
        return not any(name.startswith(p) for p in value[1:].split(","))
    if value.startswith("="):
        return name in value[1:].split(",")
    return any(name.startswith(p) for p in value.split(","))


def model_folder(model: str) -> Finding:
    from vlserve.config import ModelConfig

    try:
        cfg = ModelConfig.from_dir(model)
    except VLServeError as e:
        return Finding("model folder", False, str(e), "copy the checkpoint folder to this path on every node")
    return Finding("model folder", True, f"{model}: {cfg.architecture}, {cfg.num_hidden_layers} layers")


def skew(mine, reports: list[NodeReport], model: str | None) -> list[Finding]:
    """Versions and model files must agree across nodes: each is compared with the node running doctor."""
    from vlserve.distributed.cluster import describe_difference

    found = []
    for report in reports:
        problem = describe_difference(mine, report.facts, model or "")
        if problem:  # "<what differs>; <what to do>"
            what, _, fix = problem.rpartition("; ")
            found.append(Finding(f"node {report.node}", False, what, fix))
    if not found:
        same = "run the same versions as this one" + (" and hold the same model files" if model else "")
        found.append(Finding("cluster", True, f"all {len(reports)} nodes {same}" if len(reports) > 1 else
                             "one node, this one: nothing to compare (`vlserve cluster join` adds others)"))
    return found


def run(head: str | None, model: str | None, on_cluster: bool) -> tuple[list[NodeReport], list[Finding]]:
    if not on_cluster:
        return [check_node(head, model)], []
    from vlserve.distributed.cluster import node_facts, run_on_each_node

    reports = []
    for ip, report in run_on_each_node(check_node, head, model):
        report.node = f"{ip} ({report.node})"
        reports.append(report)
    return reports, skew(node_facts(model), reports, model)


def format_report(reports: list[NodeReport], cluster: list[Finding]) -> str:
    lines = []
    for report in reports:
        lines.append(f"{report.node}:")
        lines += [line for f in report.findings for line in finding_lines(f)]
    if cluster:
        lines.append("across nodes:")
        lines += [line for f in cluster for line in finding_lines(f)]
    return "\n".join(lines)


def finding_lines(f: Finding) -> list[str]:
    status = "ok  " if f.ok else ("FAIL" if f.fatal else "warn")
    return [f"  {status} {f.check}: {f.detail}"] + ([f"       fix: {f.fix}"] if f.fix and not f.ok else [])


def any_fatal(reports: list[NodeReport], cluster: list[Finding]) -> bool:
    return any(not f.ok and f.fatal for f in cluster + [f for r in reports for f in r.findings])
