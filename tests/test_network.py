"""Finding the interface that reaches the head node. Two "nodes" are network namespaces joined by a veth pair whose
ends are named differently, each with a decoy `eth0` on another subnet; each must pick its own end of the link, and a
Gloo all_reduce between them must succeed with the environment we compute (and fail with the decoy)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netns import HEAD_IP, HEAD_IP6, HEAD_NIC, OFF_LINK_IP, WORKER_IP, WORKER_IP6, WORKER_NIC, Nodes, two_nodes
from vlserve.distributed import network
from vlserve.distributed.network import Interface, interface_env, parse_head_address, route_interface
from vlserve.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_loopback_head():
    assert route_interface("127.0.0.1") == Interface("lo", "127.0.0.1")
    assert route_interface("localhost").name == "lo"  # names resolve (from /etc/hosts, so no DNS traffic)
    assert Interface("lo", "127.0.0.1") in network.list_interfaces()


def test_env_names_the_interface_exactly():
    assert interface_env(Interface("ens5", "10.0.0.2")) == {"GLOO_SOCKET_IFNAME": "ens5", "NCCL_SOCKET_IFNAME": "=ens5"}


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1:6379", ("10.0.0.1", 6379)),
    ("head-node:6379", ("head-node", 6379)),
    (" [fd00::1]:29500 ", ("fd00::1", 29500)),
])
def test_parse_head_address(address, expected):
    assert parse_head_address(address) == expected


@pytest.mark.parametrize("address, message", [
    ("10.0.0.1", "needs a port"),
    (":6379", "needs a host"),
    ("10.0.0.1:", "must be a number from 1 to 65535"),
    ("10.0.0.1:http", "must be a number from 1 to 65535"),
    ("10.0.0.1:65536", "must be a number from 1 to 65535"),
    ("fd00::1:6379", "put it in brackets"),
    ("[fd00::1]", "needs a port"),
    ("tcp://10.0.0.1:6379", "give just HOST:PORT"),
])
def test_malformed_head_address(address, message):
    with pytest.raises(ConfigError, match=message):
        parse_head_address(address)


def test_unresolvable_head_suggests_interface(monkeypatch):
    def no_such_name(*args, **kwargs):  # a real lookup would send a DNS query
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(ConfigError, match=r"cannot resolve head address 'no-such-head'.*--interface NAME .*lo"):
        route_interface("no-such-head")


def test_source_address_on_no_interface(monkeypatch):
    monkeypatch.setattr(network, "list_interfaces", lambda: [Interface("ens5", "10.0.0.2")])
    with pytest.raises(ConfigError, match=r"from 127\.0\.0\.1, which is on no interface.*--interface NAME .*ens5"):
        route_interface("127.0.0.1")


@pytest.fixture(scope="module")
def nodes():
    with two_nodes("net") as made:
        yield made


def test_each_node_picks_its_end_of_the_link(nodes):
    worker = _probe(nodes.worker, HEAD_IP, HEAD_IP6, OFF_LINK_IP)
    assert worker[HEAD_IP] == {"name": WORKER_NIC, "local_ip": WORKER_IP}
    assert worker[HEAD_IP6] == {"name": WORKER_NIC, "local_ip": WORKER_IP6}
    assert worker[OFF_LINK_IP] == {"name": "eth0", "local_ip": "10.231.6.2"}  # routes, not names, decide
    head = _probe(nodes.head, WORKER_IP, HEAD_IP)
    assert head[WORKER_IP] == {"name": HEAD_NIC, "local_ip": HEAD_IP}
    assert head[HEAD_IP] == {"name": HEAD_NIC, "local_ip": HEAD_IP}  # the head's own address: its NIC, not lo


def test_unroutable_head_suggests_interface(nodes):
    error = _probe(nodes.head, OFF_LINK_IP)[OFF_LINK_IP]
    assert f"no route from this node to head '{OFF_LINK_IP}'" in error
    assert "pass --interface NAME (this node has: " in error and HEAD_NIC in error


def test_gloo_all_reduce_across_nodes(nodes):
    assert _all_reduce(nodes, port=29511) == [f"{HEAD_NIC} 3.0", f"{WORKER_NIC} 3.0"]


def test_gloo_fails_on_the_decoy_interface(nodes):
    """The control, and the classic failure: the worker binds its default-route NIC, joins the store (it can reach
    the head) and then the mesh fails, because Gloo dials each pair from the higher address to the lower and the head
    has no route to the decoy address the worker advertised."""
    with pytest.raises(AssertionError, match=r"rank 0 failed:(.|\n)*connect: Network is unreachable"):
        _all_reduce(nodes, port=29512, worker_nic="eth0", timeout_s=5)


def _in_netns(ns: str, code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


PROBE = """
import dataclasses, json, sys
from vlserve.distributed.network import route_interface
from vlserve.errors import ConfigError
found = {}
for head in sys.argv[1:]:
    try:
        found[head] = dataclasses.asdict(route_interface(head))
    except ConfigError as e:
        found[head] = str(e)
print(json.dumps(found))
"""


def _probe(ns: str, *heads: str) -> dict:
    """route_interface for each head, run inside the namespace: {head: Interface as a dict, or the error text}."""
    out, err = _in_netns(ns, PROBE, *heads).communicate(timeout=30)
    assert out, err
    return json.loads(out)


ALL_REDUCE = """
import datetime, os, sys
import torch
import torch.distributed as dist
from vlserve.distributed.network import interface_env, route_interface
rank, peer, store, nic, timeout_s = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
# "route": what `vlserve cluster` will do; any other value names the interface by hand (the control)
os.environ.update(interface_env(route_interface(peer)) if nic == "route" else {"GLOO_SOCKET_IFNAME": nic})
dist.init_process_group("gloo", init_method=f"tcp://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=timeout_s))
x = torch.tensor([rank + 1.0])
dist.all_reduce(x)
print(os.environ["GLOO_SOCKET_IFNAME"], x.item())
dist.destroy_process_group()  # exiting with the group alive can abort ("terminate called without an active exception")
"""


def _all_reduce(nodes: Nodes, port: int, worker_nic: str = "route", timeout_s: int = 30) -> list[str]:
    """Rank 0 in the head namespace, rank 1 in the worker's; each sets its env from its own route to the other.
    Each call takes its own store port so one never waits on the last one's socket."""
    store = f"{HEAD_IP}:{port}"
    ranks = [_in_netns(nodes.head, ALL_REDUCE, "0", WORKER_IP, store, "route", str(timeout_s)),
             _in_netns(nodes.worker, ALL_REDUCE, "1", HEAD_IP, store, worker_nic, str(timeout_s))]
    try:
        outputs = []
        for rank, p in enumerate(ranks):  # the head first: when it fails, stop rather than wait out the worker
            out, err = p.communicate(timeout=timeout_s + 30)
            assert p.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
            outputs.append(out.strip())
        return outputs
    finally:
        for p in ranks:  # never leave a rank running in a namespace we are about to delete
            p.kill()
            p.communicate()
