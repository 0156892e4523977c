"""`vlserve cluster`: start, join, inspect and stop a Ray cluster, and check that its nodes can serve together.

Each node binds Ray, Gloo and NCCL to the interface that routes to the head, found on that node (machines name
their NICs differently), so nobody writes per-node env files. Before serving, every node must run the same vlserve
and torch and see the same model files; the first node that differs is named.
"""

import hashlib
import ipaddress
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import vlserve
from vlserve.distributed.network import Interface, interface_env, list_interfaces, parse_head_address, \
    route_interface
from vlserve.args import int_list
from vlserve.errors import ClusterError, ConfigError

HASHED_FILE_BYTES = 64 * 2**20  # files up to this size are hashed; larger ones (weights) compared by size
RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")  # Ray's `ray` command, from this Python's environment
NO_DASHBOARD = "--include-dashboard=false"  # the head's dashboard needs packages we do not install
# Ray >= 2.5x turns token auth on for a head that finds ~/.ray/auth_token (any local ray.init() writes one), but
# joining nodes do not send it: one explicit mode for every node. RAY_AUTH_MODE=token set by the operator wins.
AUTH_MODE = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
# Ray swaps a loopback node address for the machine's routable one (and listens on every interface) unless told
# the cluster is local: with this, `--node-ip-address 127.0.0.1` means what it says, for the nodes and drivers.
LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# In the environment of every Ray process vlserve starts (its children inherit it): `cluster stop` finds them by it
MARK = "VLSERVE_CLUSTER_HEAD"
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL for what is still running after this


@dataclass(frozen=True)
class StartOptions:
    """Resources this node offers and how its Ray processes run."""

    gpus: str | None = None  # "0,3,4": the cards Ray may hand out on this node (default: all)
    num_cpus: int | None = None
    interface: str | None = None  # by name, instead of the detected one
    temp_dir: str | None = None
    block: bool = False  # stay in the foreground (containers, supervisors)


def start_head(port: int, node_ip: str | None, options: StartOptions) -> str:
    """Starts the Ray head on this machine; returns the address workers join."""
    resource_args, resource_env = _resource_args(options)
    nic = _named_interface(options.interface) if options.interface else None
    if node_ip is None:
        node_ip = nic.local_ip if nic else _default_route_ip()
    nic = nic or _interface_owning(node_ip)
    address = f"[{node_ip}]:{port}" if ":" in node_ip else f"{node_ip}:{port}"
    if is_loopback(node_ip):
        print(f"head {address} on interface {nic.name}: Ray listens on {node_ip} only, so only this machine can "
              f"join (vlserve cluster join {address}); give a routable address for other machines", flush=True)
    else:
        print(f"head {address} on interface {nic.name}; on each other machine run:\n"
              f"  vlserve cluster join {address}", flush=True)
    _ray_start(["--head", f"--port={port}", f"--node-ip-address={node_ip}", NO_DASHBOARD, *resource_args],
               resource_env, nic, address)
    return address


def join(head: str, options: StartOptions) -> Interface:
    """Joins this machine to the cluster at `head` (HOST:PORT) over the interface that routes to it."""
    host, port = parse_head_address(head)
    resource_args, resource_env = _resource_args(options)
    nic = _named_interface(options.interface) if options.interface else None
    check_reachable(head, "the head address")  # Ray would retry an absent head for minutes
    nic = nic or route_interface(host, port)
    print(f"joining {head} from {nic.local_ip} on interface {nic.name}", flush=True)
    _ray_start([f"--address={head}", f"--node-ip-address={nic.local_ip}", *resource_args], resource_env, nic, head)
    return nic


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def stop() -> int:
    """Stops the Ray processes vlserve started on this machine, and no other (a Ray of someone else's stays up);
    returns how many there were."""
    started = started_processes()
    pids = list(started)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)  # bounded: the processes exit on their own, or get SIGKILL below
    for pid in pids:
        if _running(pid):
            _signal(pid, signal.SIGKILL)
    _forget_address(set(started.values()))
    return len(pids)


def _forget_address(heads: set[str]) -> None:
    """Ray's record of this machine's cluster, which `ray.init("auto")` would otherwise wait on, if it names a head
    stopped here."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.exists() and path.read_text().strip() in heads:
        path.unlink(missing_ok=True)


def started_processes() -> dict[int, str]:
    """pid -> head address of the processes of this user whose environment carries MARK: the Ray processes vlserve
    started and their children (our workers among them). Linux's /proc; elsewhere none can be told apart, so this
    refuses."""
    proc = Path("/proc")
    if not (proc / "self" / "environ").exists():
        raise ClusterError("`vlserve cluster stop` finds the processes it started in /proc (Linux); on this system "
                           "stop Ray with `ray stop`")
    marker, mine = f"{MARK}=".encode(), {os.getpid(), os.getppid()}
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # another user's process, or gone
            continue
        for var in environ.split(b"\0"):
            if var.startswith(marker):
                found[int(entry.name)] = var[len(marker):].decode(errors="replace")
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; its parent has not collected it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _resource_args(options: StartOptions) -> tuple[list[str], dict[str, str]]:
    """`ray start` flags and environment for what this node offers; bad flags fail here, before anything starts."""
    args, env = [], {}
    if options.gpus is not None:
        gpus = _parse_gpus(options.gpus)
        args.append(f"--num-gpus={len(gpus)}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    if options.num_cpus is not None:
        args.append(f"--num-cpus={options.num_cpus}")
    if options.temp_dir:
        args.append(f"--temp-dir={options.temp_dir}")
    if options.block:
        args.append("--block")
    return args, env


def _ray_start(args: list[str], resource_env: dict[str, str], nic: Interface, head: str) -> None:
    # Ray's processes, our workers among them, inherit this environment
    env = {**os.environ, **interface_env(nic), **AUTH_MODE, **resource_env, MARK: head}
    if is_loopback(parse_head_address(head)[0]):
        env.update(LOCAL_ONLY)
    cmd = [*RAY_CLI, "start", *args, "--disable-usage-stats"]
    if subprocess.run(cmd, env=env, check=False).returncode != 0:
        raise ClusterError(f"`ray start` failed ({' '.join(args)}); see its output above. If Ray is already "
                           "running on this machine, stop it first: vlserve cluster stop")


def _parse_gpus(text: str) -> tuple[int, ...]:
    gpus = int_list("--gpus", text, "card indexes", "0,3,4")
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {text!r} must list distinct card indexes from 0, e.g. 0,3,4")
    import torch  # only here: the other cluster commands start fast

    present = torch.cuda.device_count()
    if max(gpus) >= present:
        raise ConfigError(f"--gpus {text}: this machine has {present} GPU(s) torch can see (indexes 0 to "
                          f"{present - 1}); list only those" if present else
                          f"--gpus {text}: torch sees no GPU on this machine; leave --gpus out on a CPU-only node")
    return gpus


def _named_interface(name: str) -> Interface:
    found = [i for i in list_interfaces() if i.name == name]
    if not found:
        names = ", ".join(dict.fromkeys(i.name for i in list_interfaces()))
        raise ConfigError(f"--interface {name!r} is not on this machine (it has: {names})")
    return min(found, key=lambda i: ":" in i.local_ip)  # IPv4 first


def _interface_owning(ip: str) -> Interface:
    for nic in list_interfaces():
        if nic.local_ip == ip:
            return nic
    raise ConfigError(f"--node-ip-address {ip} is on no interface of this machine; give one of its addresses")


def _default_route_ip() -> str:
    try:  # the source address of the default route; no packet is sent
        return route_interface("192.0.2.1").local_ip  # TEST-NET-1: routed like any remote address
    except ConfigError:
        raise ConfigError("this machine has no default route, so the head's address is ambiguous; pass "
                          "--node-ip-address IP or --interface NAME") from None


# ---- asking the running cluster ----

def connect() -> None:
    """Connects this process to the cluster this machine belongs to (RAY_ADDRESS, else the local one)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "auto")
    bootstrap = _bootstrap_address(address)
    if bootstrap:
        check_reachable(bootstrap, "RAY_ADDRESS" if address != "auto" else "this machine's Ray cluster")
    os.environ.update(AUTH_MODE)  # as the nodes were started
    if bootstrap and is_loopback(parse_head_address(bootstrap)[0]):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # LOCAL_ONLY, read by Ray when it was imported
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as e:
        raise ClusterError(f"no Ray cluster at {address} ({e}); start one with `vlserve cluster head` here and "
                           "`vlserve cluster join HEAD:PORT` on the other machines, or set RAY_ADDRESS") from None
    except ray.exceptions.AuthenticationError as e:
        raise ClusterError(f"the Ray cluster at {address} refused us ({e}); start it with `vlserve cluster head`, "
                           "or set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN) on every node") from None


def _bootstrap_address(address: str) -> str | None:
    """RAY_ADDRESS, or for "auto" the cluster this machine's Ray last started or joined (None: none)."""
    if address != "auto":
        return address.removeprefix("ray://")
    from ray._private.utils import read_ray_address

    return read_ray_address()


def check_reachable(address: str, source: str = "RAY_ADDRESS", timeout_s: float = 5) -> None:
    """Ray retries an unreachable head for minutes; a plain connection says at once what is wrong."""
    host, port = parse_head_address(address.removeprefix("ray://"))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray head at {address} ({source}): {e.strerror or e}; is `vlserve "
                           "cluster head` running there, and is the port open between the machines?") from None


def alive_nodes() -> list[dict]:
    import ray

    return sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: n["NodeManagerAddress"])


def run_on_each_node(fn: Callable, *args, timeout_s: float = 120) -> list[tuple[str, Any]]:
    """(node IP, fn(*args) run on that node) for every live node, in IP order."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect()
    remote = ray.remote(num_cpus=0)(fn)  # no CPU: runs even where every CPU is reserved for workers
    nodes = alive_nodes()
    refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in nodes]
    try:
        results = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"a node did not answer within {timeout_s:.0f} s; check `vlserve cluster status`") from None
    return [(n["NodeManagerAddress"], r) for n, r in zip(nodes, results)]


@dataclass
class NodeFacts:
    """What must agree across nodes for their workers to serve one model together."""

    hostname: str
    python: str
    vlserve: str
    torch: str
    model_files: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (bytes, sha256 or "")
    model_error: str = ""


def node_facts(model_dir: str | None = None) -> NodeFacts:
    import torch

    facts = NodeFacts(socket.gethostname(), platform.python_version(), vlserve.__version__, torch.__version__)
    if model_dir is not None:
        try:
            facts.model_files = model_fingerprint(Path(model_dir))
        except OSError as e:
            facts.model_error = f"cannot read {model_dir}: {e.strerror or e}"
    return facts


def model_fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    if not folder.is_dir():
        raise FileNotFoundError(2, "no such folder")
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest = hashlib.file_digest(path.open("rb"), "sha256").hexdigest() if size <= HASHED_FILE_BYTES else ""
        found[str(path.relative_to(folder))] = (size, digest)
    return found


def check_nodes(model_dir: str) -> None:
    """Raises ClusterError naming the first node whose software or model files differ from this one's."""
    mine = node_facts(model_dir)
    for ip, theirs in run_on_each_node(node_facts, model_dir):
        problem = describe_difference(mine, theirs, model_dir)
        if problem:
            raise ClusterError(f"node {ip} ({theirs.hostname}) {problem}")


def describe_difference(mine: NodeFacts, theirs: NodeFacts, model_dir: str) -> str:
    if theirs.model_error:
        return f"{theirs.model_error}; copy the model folder to the same path on every node"
    for name in ("python", "vlserve", "torch"):
        if getattr(mine, name) != getattr(theirs, name):
            return (f"runs {name} {getattr(theirs, name)}, this node {getattr(mine, name)}; install the same "
                    "versions on every node (the same container image is simplest)")
    if mine.model_files != theirs.model_files:
        names = sorted(set(mine.model_files) | set(theirs.model_files))
        differ = [n for n in names if mine.model_files.get(n) != theirs.model_files.get(n)]
        return (f"has different model files in {model_dir}: {', '.join(differ[:5])}"
                f"{' ...' if len(differ) > 5 else ''}; copy the same model folder to every node")
    return ""


def status() -> list[dict]:
    """One row per live node: address, resources, and what must agree across nodes."""
    import ray

    connect()
    resources = {n["NodeManagerAddress"]: n["Resources"] for n in alive_nodes()}
    rows = []
    for ip, facts in run_on_each_node(node_facts):
        res = resources.get(ip, {})
        rows.append({"ip": ip, "head": "node:__internal_head__" in res, "gpus": int(res.get("GPU", 0)),
                     "cpus": int(res.get("CPU", 0)), **asdict(facts)})
    ray.shutdown()
    return rows


def format_status(rows: list[dict]) -> str:
    lines = [f"{'node':<18} {'host':<16} {'role':<6} {'GPUs':>4} {'CPUs':>4}  vlserve  torch"]
    first = rows[0] if rows else {}
    for row in rows:
        skew = [k for k in ("python", "vlserve", "torch") if row[k] != first[k]]
        lines.append(f"{row['ip']:<18} {row['hostname'][:16]:<16} {'head' if row['head'] else 'worker':<6} "
                     f"{row['gpus']:>4} {row['cpus']:>4}  {row['vlserve']:<8} {row['torch']}"
                     + (f"   <- differs: {', '.join(skew)}" if skew else ""))
    return "\n".join(lines)
