"""The hardware a plan is for: this machine (torch.cuda, or its memory when it has no GPU), every node of a Ray
cluster, or a cluster described as `--cluster SPEC` (e.g. 2x8xRTX2080Ti or 1x4xA100-80GB,1x4xA100-40GB)."""

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vlserve.errors import ConfigError
from vlserve.plan.cards import Card, find_card

SPEC_EXAMPLE = "e.g. 8xH100, 2x8xRTX2080Ti or 1x4xA100-80GB,1x4xA100-40GB"


@dataclass(frozen=True)
class Node:
    name: str
    gpus: tuple[Card, ...]
    memory_bytes: int = 0  # system memory (a CPU plan's: the memory free); unknown for a --cluster SPEC


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[Node, ...]
    source: str  # where it came from, for the report

    @property
    def num_gpus(self) -> int:
        return sum(len(node.gpus) for node in self.nodes)

    @property
    def is_cpu(self) -> bool:
        return self.num_gpus == 0

    def describe(self) -> str:
        if self.is_cpu:
            return f"{self.source}: CPU only, {self.nodes[0].memory_bytes / 2**30:.1f} GiB of memory free"
        groups = []
        for node in self.nodes:
            names = [card.name for card in node.gpus]
            kinds = ", ".join(f"{names.count(n)}x {n}" for n in dict.fromkeys(names))
            groups.append(f"{node.name}: {kinds or 'no GPU'}")
        return f"{self.source}: " + "; ".join(groups)


def parse_cluster(spec: str) -> Inventory:
    """`[NODES x] GPUS x CARD`, comma-separated groups; cards from the table in cards.py."""
    nodes = []
    for group in spec.split(","):
        match = re.fullmatch(r"\s*(?:(\d+)\s*[xX]\s*)?(\d+)\s*[xX]\s*(\S.*?)\s*", group)
        if not match:
            raise ConfigError(f"--cluster {spec!r}: cannot read {group.strip()!r}; write [NODES x] GPUS x CARD, "
                              f"{SPEC_EXAMPLE}")
        count, gpus, card = int(match[1] or 1), int(match[2]), find_card(match[3])
        if count < 1 or gpus < 1:
            raise ConfigError(f"--cluster {spec!r}: node and GPU counts must be at least 1, {SPEC_EXAMPLE}")
        nodes += [Node(f"node{len(nodes) + i}", (card,) * gpus) for i in range(count)]
    return Inventory(tuple(nodes), f"--cluster {spec}")


def has_nvidia_driver() -> bool:
    """Cheap: no torch import. A machine without the driver (or with every card hidden) plans for its CPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg"))


def system_memory_bytes() -> int:
    """Physical memory, or the container's cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def available_memory_bytes() -> int:
    """Memory a new process can take now without swapping: MemAvailable, or what the container's cgroup limit
    leaves when that is less."""
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # no /proc (macOS) or an old kernel: all of it, as before
        return system_memory_bytes()
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return available
    return min(available, int(limit) - current) if limit.isdigit() else available


def this_node() -> Node:
    """This machine's GPUs (CUDA_VISIBLE_DEVICES applies) and its memory. The driver's list (nvidia-smi) answers in
    a fraction of a second; torch, which must start CUDA first (seconds), only where nvidia-smi cannot answer."""
    gpus = ()
    if has_nvidia_driver():
        gpus = driver_cards()
        if gpus is None:
            import torch

            gpus = tuple(Card(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory,
                              torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count()))
    return Node(socket.gethostname(), gpus, system_memory_bytes())


SMI_QUERY = ("nvidia-smi", "--query-gpu=index,uuid,name,memory.total,compute_cap", "--format=csv,noheader,nounits")


def driver_cards() -> tuple[Card, ...] | None:
    """The cards nvidia-smi lists, in CUDA_VISIBLE_DEVICES' order and selection (indexes or UUID prefixes; like
    CUDA, the list stops at the first entry that names no card); None where nvidia-smi is missing or fails."""
    try:
        out = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=15, check=True).stdout
        rows = [[field.strip() for field in line.split(",")] for line in out.splitlines() if line.strip()]
        cards = {index: Card(name, int(float(mib)) << 20, tuple(map(int, cap.split(".")))) for index, _, name, mib, cap
                 in rows}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(cards.values())
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        match = [index for index, uuid, *_ in rows
                 if entry == index or (entry.startswith("GPU-") and uuid.startswith(entry))]
        if not match:
            break
        chosen.append(cards[match[0]])
    return tuple(chosen)


def ray_inventory() -> Inventory:
    """Every live node of the Ray cluster this machine belongs to (`vlserve cluster`)."""
    from vlserve.distributed.cluster import run_on_each_node

    nodes = tuple(Node(ip, node.gpus, node.memory_bytes) for ip, node in run_on_each_node(this_node))
    return Inventory(nodes, "Ray cluster")


def cpu_inventory() -> Inventory:
    """This machine as a CPU plan sees it: no GPU, the memory free now (weights, activations and the KV cache
    must all fit in it)."""
    return Inventory((Node(socket.gethostname(), (), available_memory_bytes()),), "this machine")


def inventory(spec: str | None, cpu: bool = False) -> Inventory:
    """--cluster SPEC, --cluster ray, or (None) this machine; `cpu`: its CPU even if it has GPUs (--device cpu)."""
    if spec is None and cpu:
        return cpu_inventory()
    if spec is None:
        return Inventory((this_node(),), "this machine")
    if spec.strip().lower() == "ray":
        return ray_inventory()
    return parse_cluster(spec)
