"""Where the model runs: in this process, or as tensor-parallel groups in pipeline stages, one spawned process
per rank (`mp`).

With `mp`, global rank 0 lives in the engine's process: it prepares each step (block tables, media embeddings)
and broadcasts it; every rank runs its part (its weight shard of its stage's layers), so the collectives inside
the model line up, and stages hand hidden states on. Processes are always started with `spawn` (never fork
after CUDA is initialised). Stages run one after another for a step (no micro-batches in flight yet).
"""

import atexit
import logging
import multiprocessing as mp
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from vlserve.config import EngineConfig, ModelConfig
from vlserve.distributed.parallel_state import PipelineStage, TensorParallelGroup, reset, set_pipeline_stage, \
    set_tp_group
from vlserve.engine.model_runner import ModelRunner
from vlserve.errors import EngineDeadError
from vlserve.media.item import MediaItem

log = logging.getLogger("vlserve.distributed")
REDUCE_MIN = ("profile_free_blocks",)  # results every rank must agree on: the smallest wins
GATHER = ("encode_share",)  # results rank 0 collects from every rank


def make_runner(model_cfg: ModelConfig, engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                progress: bool = True):
    if engine_cfg.tensor_parallel_size * engine_cfg.pipeline_parallel_size == 1:
        reset()  # whole layers in one stage, whatever an earlier engine in this process used
        return ModelRunner(model_cfg, engine_cfg, device, dtype, progress=progress)
    return MultiprocRunner(model_cfg, engine_cfg, device, dtype, progress)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_groups(rank: int, tp: int, pp: int, init_method: str, device: torch.device, timeout_s: float) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=tp * pp,
                            timeout=timedelta(seconds=timeout_s))
    stage = rank // tp
    for s in range(pp):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(s * tp, (s + 1) * tp)))
        if s == stage:
            set_tp_group(TensorParallelGroup(rank % tp, tp, group))
    set_pipeline_stage(PipelineStage(stage, pp, rank - tp if stage > 0 else None,
                                     rank + tp if stage < pp - 1 else None))


def control_group() -> dist.ProcessGroup:
    """Step descriptions travel as pickled objects over Gloo (CPU), whatever carries the model's collectives."""
    return dist.new_group(backend="gloo")


def worker_main(rank: int, init_method: str, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                device: torch.device, dtype: torch.dtype) -> None:
    device = rank_device(device, rank)
    init_groups(rank, engine_cfg.tensor_parallel_size, engine_cfg.pipeline_parallel_size, init_method, device,
                engine_cfg.distributed_timeout_s)
    control = control_group()
    runner = ModelRunner(model_cfg, engine_cfg, device, dtype, progress=False)
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        method, args = message[0]
        if method == "shutdown":
            break
        result = getattr(runner, method)(*args)
        if method in REDUCE_MIN:
            min_across_ranks(result, control)
        elif method in GATHER:
            dist.gather_object(result, None, dst=0, group=control)
    dist.destroy_process_group()


def min_across_ranks(value: int, group) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def balanced_owners(sizes: list[int], ranks: int) -> list[int]:
    """Rank for each item: largest first, each to the least-loaded rank."""
    load, owner = [0] * ranks, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(ranks), key=load.__getitem__)
        load[owner[i]] += sizes[i]
    return owner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocRunner:
    """Global rank 0; the same interface as ModelRunner for the engine."""

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 progress: bool):
        tp, pp = engine_cfg.tensor_parallel_size, engine_cfg.pipeline_parallel_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.workers = [ctx.Process(target=worker_main, name=f"vlserve-rank{rank}", daemon=True,
                                    args=(rank, init_method, model_cfg, engine_cfg, device, dtype))
                        for rank in range(1, tp * pp)]
        for worker in self.workers:
            worker.start()
        atexit.register(self.shutdown)
        init_groups(0, tp, pp, init_method, rank_device(device, 0), engine_cfg.distributed_timeout_s)
        self.control = control_group()
        self.runner = ModelRunner(model_cfg, engine_cfg, rank_device(device, 0), dtype, progress=progress)
        self.runner.encode = self.encode_spread
        self.tp = tp
        self.closed = self.broken = False
        log.info("tensor parallel %d x pipeline parallel %d over %s", tp, pp, dist.get_backend())

    @property
    def vision_cache(self):
        return self.runner.vision_cache

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def call(self, method: str, *args):
        self.check_workers()
        dist.broadcast_object_list([(method, args)], src=0, group=self.control)
        try:
            return getattr(self.runner, method)(*args)
        except BaseException:
            self.broken = True  # the workers may be waiting in a collective rank 0 will never join
            raise

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.call("allocate_kv_cache", num_blocks)

    def profile_free_blocks(self, *args) -> int:
        return min_across_ranks(self.call("profile_free_blocks", *args), self.control)

    def encode_spread(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Vision data mode: the first stage's ranks each encode a share of the step's new media (balanced by
        patch count); rank 0 gathers the embeddings."""
        if self.tp == 1 or len(items) < 2:
            return self.runner.model.encode_media(items)
        owner = balanced_owners([item.pixel_values.shape[0] for item in items], self.tp)
        shares = [[item for item, o in zip(items, owner) if o == rank] for rank in range(self.tp)]
        self.check_workers()
        dist.broadcast_object_list([("encode_share", (shares,))], src=0, group=self.control)
        mine = self.runner.model.encode_media(shares[0])
        gathered = [None] * dist.get_world_size()
        dist.gather_object([], gathered, dst=0, group=self.control)
        gathered[0] = mine
        parts = [iter(g) for g in gathered]
        return [next(parts[o]).to(self.runner.device) for o in owner]

    def execute(self, scheduled):
        step, sample_seqs = self.runner.prepare(scheduled)
        return sample_seqs, self.call("run", step)

    def check_workers(self) -> None:
        for worker in self.workers:
            if not worker.is_alive():
                raise EngineDeadError(f"worker {worker.name} exited (code {worker.exitcode}); restart the server")

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.broken and all(w.is_alive() for w in self.workers):
            dist.broadcast_object_list([("shutdown", ())], src=0, group=self.control)
        else:  # the group is broken: stop the survivors rather than wait on a collective
            for worker in self.workers:
                worker.kill()
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
        dist.destroy_process_group()
        reset()
