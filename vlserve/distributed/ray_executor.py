"""Ranks 1.. as Ray actors across the machines of a `vlserve cluster`; rank 0 stays in the engine's process.

A placement group reserves one slot per rank (a GPU, or a CPU on a CPU-only cluster), the first pinned to this
machine for rank 0. Slots are ranked node by node, so each tensor-parallel group sits inside one machine (its
all-reduces never cross the network) and only pipeline hand-offs go between machines. The workers run the same
`worker_main` as the `mp` executor.
"""

import logging
import os
import time
from urllib.parse import urlparse

import ray
import torch
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from vlserve.config import EngineConfig, ModelConfig
from vlserve.distributed.cluster import alive_nodes, check_nodes, connect
from vlserve.distributed.executor import MultiprocRunner, worker_main
from vlserve.distributed.network import Interface, interface_env, parse_head_address, route_interface
from vlserve.errors import ClusterError

log = logging.getLogger("vlserve.distributed")
WAIT_LOG_S = 10  # while waiting for machines to join, say so this often


class RankActor:
    """One rank's process on some node."""

    def where(self) -> tuple[str, list, int]:
        return ray.util.get_node_ip_address(), ray.get_gpu_ids(), os.getpid()

    def run(self, rank: int, init_method: str, model_cfg: ModelConfig, engine_cfg: EngineConfig,
            device: torch.device, dtype: torch.dtype) -> None:
        bind_interface_to(urlparse(init_method).hostname)
        worker_main(rank, init_method, model_cfg, engine_cfg, device, dtype)


def bind_interface_to(host: str) -> Interface:
    """Gloo/NCCL on this node use the interface that routes to `host` (returned), unless the operator chose one."""
    nic = route_interface(host)
    for key, value in interface_env(nic).items():
        os.environ.setdefault(key, value)
    return nic


class RayWorker:
    """A rank's actor, with the liveness interface of multiprocessing.Process that MultiprocRunner uses."""

    def __init__(self, actor, rank: int, node_ip: str, pid: int, done: ray.ObjectRef):
        self.actor, self.name, self.pid = actor, f"rank{rank} on {node_ip}", pid
        self.done = done  # the ObjectRef of its run(): ready once the rank stops, for whatever reason

    def is_alive(self) -> bool:
        return not ray.wait([self.done], timeout=0)[0]

    @property
    def exitcode(self) -> str:
        try:
            ray.get(self.done, timeout=0)
            return "returned"
        except Exception as e:  # what killed the rank (actor died, node lost, an error) is the answer
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def join(self, timeout: float) -> None:
        ray.wait([self.done], timeout=timeout)

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RayRunner(MultiprocRunner):
    placement = None  # set by start_workers; shutdown may run before it
    rank0_slot = None

    def rendezvous_host(self) -> str:
        connect()
        head, _ = parse_head_address(ray.get_runtime_context().gcs_address)
        return bind_interface_to(head).local_ip  # this machine's address on the network the cluster uses

    def start_workers(self, init_method: str, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                      device: torch.device, dtype: torch.dtype) -> torch.device:
        check_nodes(engine_cfg.model)
        world = engine_cfg.world_size
        gpu = device.type == "cuda"
        self.placement = self.place(world, gpu, urlparse(init_method).hostname, engine_cfg.distributed_timeout_s)
        slots = self.slots_by_node()
        actor_cls = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0)(RankActor)
        actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.placement, placement_group_bundle_index=slot)).remote() for slot in slots]
        self.rank0_slot = actors[0]  # holds rank 0's card while this process uses it
        where = ray.get([a.where.remote() for a in actors])
        worker_device = torch.device("cuda", 0) if gpu else device  # Ray shows each actor only its own card
        self.workers = [RayWorker(actors[rank], rank, ip, pid, actors[rank].run.remote(
            rank, init_method, model_cfg, engine_cfg, worker_device, dtype))
            for rank, (ip, _, pid) in enumerate(where) if rank > 0]
        log.info("ranks on nodes: %s", ", ".join(f"{r}:{ip}" for r, (ip, _, _) in enumerate(where)))
        return torch.device("cuda", local_index(where[0][1][0])) if gpu else device

    def place(self, world: int, gpu: bool, here: str, timeout_s: float):
        """Reserves a slot per rank, waiting up to `timeout_s` for machines still joining (a supervisor may start
        the head's server before the workers have joined)."""
        unit = "GPU" if gpu else "CPU"
        # rank 0 runs in this process, so its slot must be on this machine: the node:<ip> resource pins it
        bundles = [{unit: 1, f"node:{here}": 0.001}] + [{unit: 1}] * (world - 1)
        pg = placement_group(bundles, strategy="PACK")
        deadline = time.monotonic() + timeout_s
        while not pg.wait(max(0.0, min(WAIT_LOG_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                remove_placement_group(pg)
                raise ClusterError(
                    f"--tensor-parallel-size x --pipeline-parallel-size = {world} ranks need {world} {unit}s with "
                    f"one on this machine ({here}); after {timeout_s:g} s the cluster has {describe_nodes(unit)}, "
                    "in use or not. Add machines with `vlserve cluster join`, free the slots, or lower the sizes")
            log.warning("waiting for %d free %ss (cluster: %s); start `vlserve cluster join` on the other machines",
                        world, unit, describe_nodes(unit))
        return pg

    def slots_by_node(self) -> list[int]:
        """Bundle indexes in rank order: rank 0's first, then grouped by node."""
        node_of = placement_group_table(self.placement)["bundles_to_node_id"]
        first = node_of[0]
        return sorted(node_of, key=lambda b: (b != 0, node_of[b] != first, node_of[b], b))

    def shutdown(self) -> None:
        super().shutdown()
        actors = [w.actor for w in self.workers]
        if self.rank0_slot is not None:
            actors.append(self.rank0_slot)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None


def local_index(ray_gpu_id) -> int:
    """Ray names cards by their index on the node; this process may see them renumbered by CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return int(ray_gpu_id)
    ids = [v.strip() for v in visible.split(",")]
    if str(ray_gpu_id) not in ids:
        raise ClusterError(f"Ray gave rank 0 GPU {ray_gpu_id}, which this process cannot see (CUDA_VISIBLE_DEVICES="
                           f"{visible}); start `vlserve serve` without CUDA_VISIBLE_DEVICES and choose cards with "
                           "`vlserve cluster head --gpus`")
    return ids.index(str(ray_gpu_id))


def describe_nodes(unit: str) -> str:
    """'ip: count' of `unit` for every live node."""
    total = {n["NodeManagerAddress"]: n["Resources"].get(unit, 0) for n in alive_nodes()}
    return ", ".join(f"{ip}: {n:g}" for ip, n in sorted(total.items())) or "no live nodes"
