"""Two "machines" on one host: network namespaces joined by a veth pair whose ends are named differently, each
with a decoy `eth0` on another subnet (the worker's holds its default route, as a cloud VM's primary NIC would)."""

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HEAD_IP, WORKER_IP = "10.231.7.1", "10.231.7.2"
HEAD_IP6, WORKER_IP6 = "fd31:7::1", "fd31:7::2"
HEAD_NIC, WORKER_NIC = "vls-head0", "vls-wrk9"
ETC_NETNS = Path("/etc/netns")  # per-namespace files that `ip netns exec` mounts over /etc
OFF_LINK_IP = "10.99.0.1"  # on no link of either node: only the worker has a route to it, its default route


@dataclass
class Nodes:
    head: str  # network namespace names
    worker: str


@contextlib.contextmanager
def two_nodes(tag: str):
    """Namespaces named by `tag` and this process, deleted however the caller ends; skips where none can be made."""
    pid = os.getpid()
    made = Nodes(f"vls-{tag}-head-{pid}", f"vls-{tag}-wrk-{pid}")
    _netns_or_skip(made.head)  # before the try: when it skips, there is nothing to clean up
    try:
        _ip("netns", "add", made.worker)
        _link(made)
        _local_resolver(made)
        yield made
    finally:
        for ns in (made.head, made.worker):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)  # may be gone
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()  # only if no one else keeps files there


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def _netns_or_skip(name: str) -> None:
    try:
        _ip("netns", "add", name)
    except FileNotFoundError:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace (needs root or CAP_SYS_ADMIN): {e.stderr.strip()}")


def _link(nodes: Nodes) -> None:
    """head: vls-head0 10.231.7.1, decoy eth0 10.231.8.1. worker: vls-wrk9 10.231.7.2, decoy eth0 10.231.6.2 holding
    the default route, as a cloud VM's primary NIC would. A decoy is a veth whose peer stays in the same namespace
    (this kernel may lack the dummy driver); the peer only gives it carrier."""
    head, worker = nodes.head, nodes.worker
    _ip("link", "add", HEAD_NIC, "netns", head, "type", "veth", "peer", "name", WORKER_NIC, "netns", worker)
    for ns, nic, ip, ip6, decoy in ((head, HEAD_NIC, HEAD_IP, HEAD_IP6, "10.231.8.1"),
                                    (worker, WORKER_NIC, WORKER_IP, WORKER_IP6, "10.231.6.2")):
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", nic)
        _ip("-n", ns, "addr", "add", f"{ip6}/64", "dev", nic, "nodad")  # usable at once, no duplicate detection wait
        _ip("-n", ns, "addr", "add", f"{decoy}/24", "dev", "eth0")
        for link in ("lo", nic, "eth0", "eth0-peer"):
            _ip("-n", ns, "link", "set", link, "up")
    _ip("-n", worker, "route", "add", "default", "via", "10.231.6.254", "dev", "eth0")


def _local_resolver(nodes: Nodes) -> None:
    """torch looks up peers' host names. Point DNS at the namespace's own loopback (ip netns exec mounts these files
    over /etc/resolv.conf) so lookups fail at once instead of timing out behind the decoy default route."""
    for ns in (nodes.head, nodes.worker):
        (ETC_NETNS / ns).mkdir(parents=True)
        (ETC_NETNS / ns / "resolv.conf").write_text("nameserver 127.0.0.1\n")
