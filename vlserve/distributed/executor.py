"""Where the model runs: in this process (`local`), or as tensor-parallel groups in pipeline stages, one process per
rank: spawned on this machine (`mp`) or Ray actors across machines (`ray`, in ray_executor.py).

Global rank 0 lives in the engine's process: it prepares each step (block tables, media embeddings) and broadcasts
it as tensors (packed_step.py; other calls travel pickled over Gloo); every rank runs its part (its weight shard of
its stage's layers), so the collectives inside the model line up, and stages hand hidden states on (the engine
keeps up to one step per stage in flight).
Ranks start as fresh processes (`python -m vlserve.distributed.worker_process`: never a fork after CUDA is
initialised, never a re-import of the user's script), and rank 0 watches them through the rendezvous.
"""

import atexit
import contextlib
import logging
import socket
import threading
import time
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from vlserve.config import EngineConfig, ModelConfig
from vlserve.distributed import packed_step
from vlserve.distributed.parallel_state import PipelineStage, TensorParallelGroup, reset, set_pipeline_stage, \
    set_tp_group
from vlserve.distributed.worker_process import SpawnedWorker
from vlserve.engine.model_runner import ModelRunner, StepResult
from vlserve.errors import ConfigError, EngineDeadError
from vlserve.media.item import MediaItem

log = logging.getLogger("vlserve.distributed")
REDUCE_MIN = ("profile_free_blocks",)  # results every rank must agree on: the smallest wins
GATHER = ("encode_share",)  # results rank 0 collects from every rank
JOIN_POLL_S = 0.05  # how often rank 0 looks at the store and the processes while the ranks start
EXIT_SEEN_S = 2.0  # after a collective failed, how long a peer's exit may take to show (its socket closes first)


def make_runner(model_cfg: ModelConfig, engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                progress: bool = True):
    backend = choose_backend(engine_cfg, device)
    log.info("executor backend: %s", backend)
    if backend == "local":
        reset()  # whole layers in one stage, whatever an earlier engine in this process used
        return ModelRunner(model_cfg, engine_cfg, device, dtype, progress=progress)
    if backend == "ray":
        from vlserve.distributed.ray_executor import RayRunner  # Ray is an optional dependency

        return RayRunner(model_cfg, engine_cfg, device, dtype, progress)
    return MultiprocRunner(model_cfg, engine_cfg, device, dtype, progress)


def choose_backend(engine_cfg: EngineConfig, device: torch.device) -> str:
    """--distributed-executor-backend, else: one rank runs here; ranks beyond this machine's GPUs need Ray."""
    world = engine_cfg.world_size
    fits_here = device.type != "cuda" or world <= torch.cuda.device_count()
    backend = engine_cfg.distributed_executor_backend or ("local" if world == 1 else "mp" if fits_here else "ray")
    if backend == "mp" and not fits_here:
        raise ConfigError(
            f"--tensor-parallel-size x --pipeline-parallel-size = {world} ranks, one GPU each, but this machine has "
            f"{torch.cuda.device_count()}; lower the sizes or start a cluster (`vlserve cluster head`/`join`) and "
            "use --distributed-executor-backend ray")
    return backend


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def rendezvous_store(rank: int, engine_cfg: EngineConfig, init_method: str) -> dist.TCPStore:
    """torch.distributed's store at `init_method` (tcp://host:port): served by global rank 0, joined by the rest."""
    url = urlparse(init_method)
    return dist.TCPStore(url.hostname, url.port, engine_cfg.world_size, is_master=rank == 0,
                         timeout=timedelta(seconds=engine_cfg.distributed_timeout_s), wait_for_workers=False)


def init_groups(rank: int, engine_cfg: EngineConfig, store: dist.Store, device: torch.device) -> dist.ProcessGroup:
    """The default group, a tensor-parallel group per stage and the control group (returned). Every one times out
    after --distributed-timeout-s (new_group's own default is 30 minutes)."""
    tp, pp = engine_cfg.tensor_parallel_size, engine_cfg.pipeline_parallel_size
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=engine_cfg.distributed_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=engine_cfg.world_size, timeout=timeout)
    stage = rank // tp
    for s in range(pp):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(s * tp, (s + 1) * tp)), timeout=timeout)
        if s == stage:
            set_tp_group(TensorParallelGroup(rank % tp, tp, group))
    set_pipeline_stage(PipelineStage(stage, pp, rank - tp if stage > 0 else None,
                                     rank + tp if stage < pp - 1 else None, engine_cfg.pp_layer_partition))
    # Where workers wait between steps: Gloo (CPU), whatever carries the model's collectives. Steps' headers and
    # the pickled calls other than steps travel here.
    return dist.new_group(backend="gloo", timeout=timeout)


def worker_main(rank: int, init_method: str, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                device: torch.device, dtype: torch.dtype) -> None:
    """One rank other than 0, until rank 0 broadcasts shutdown. `device` is this rank's own."""
    store = rendezvous_store(rank, engine_cfg, init_method)
    store.set(f"joined/{rank}", "1")  # rank 0 watches for these while it watches the processes
    control = init_groups(rank, engine_cfg, store, device)
    runner = ModelRunner(model_cfg, engine_cfg, device, dtype, progress=False)
    while True:
        step = packed_step.receive(control, device, dtype)
        if step is not None:
            runner.run(step)
            continue
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


def worker_exited(worker) -> EngineDeadError:
    return EngineDeadError(f"worker {worker.name} exited (code {worker.exitcode}); restart the server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MultiprocRunner:
    """Global rank 0; the same interface as ModelRunner for the engine."""

    reads_pending_tokens = False  # other ranks get each step from the host: its tokens must be there

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 progress: bool):
        self.closed = self.broken = False
        self.workers = []  # before anything can fail: shutdown() reads it
        atexit.register(self.shutdown)
        try:
            host = self.rendezvous_host()
            init_method = f"tcp://{host}:{free_port(host)}"
            store = rendezvous_store(0, engine_cfg, init_method)
            device = self.start_workers(init_method, model_cfg, engine_cfg, device, dtype)
            self.wait_for_workers(store, engine_cfg.world_size, engine_cfg.distributed_timeout_s)
            self.control = self.watching_workers(lambda: init_groups(0, engine_cfg, store, device))
            if device.type == "cuda":
                torch.cuda.set_device(device)  # set in init_groups' thread, whose own it was
            self.runner = ModelRunner(model_cfg, engine_cfg, device, dtype, progress=progress)
        except BaseException:
            self.broken = True  # the workers cannot be told: stop them
            self.shutdown()
            raise
        self.runner.encode = self.encode_all if engine_cfg.mm_encoder_tp_mode == "weights" else self.encode_spread
        self.tp = engine_cfg.tensor_parallel_size
        log.info("tensor parallel %d x pipeline parallel %d over %s", self.tp, engine_cfg.pipeline_parallel_size,
                 dist.get_backend())

    def rendezvous_host(self) -> str:
        """Where the other ranks reach rank 0's torch.distributed store."""
        return "127.0.0.1"

    def start_workers(self, init_method: str, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                      device: torch.device, dtype: torch.dtype) -> torch.device:
        """Starts ranks 1.. as processes of their own (one GPU each); returns rank 0's device."""
        for rank in range(1, engine_cfg.world_size):  # appended one by one: shutdown() stops those started if one fails
            self.workers.append(SpawnedWorker(rank, (init_method, model_cfg, engine_cfg, rank_device(device, rank),
                                                     dtype)))
        return rank_device(device, 0)

    def wait_for_workers(self, store: dist.TCPStore, world: int, timeout_s: float) -> None:
        """Until every rank has reached the store; a rank that exits first fails the start at once, with its
        exit and last lines (not after the rendezvous timeout)."""
        keys, deadline = [f"joined/{rank}" for rank in range(1, world)], time.monotonic() + timeout_s
        while True:
            self.check_starting_workers()
            if store.check(keys):
                return
            if time.monotonic() >= deadline:
                raise EngineDeadError(
                    f"{world - 1} rank(s) started but not all reached rank 0's store within {timeout_s:g} s; "
                    "check the network between the machines (`vlserve doctor --head HOST:PORT`)")
            time.sleep(JOIN_POLL_S)

    def watching_workers(self, form_groups):
        """form_groups() in a thread of its own while this one watches the ranks: one that dies while the groups
        form would leave rank 0 waiting on it in a collective until the distributed timeout. Its death fails the
        start at once instead; the thread is left to that timeout (the process group is torn down under it)."""
        done: list = []

        def run():
            try:
                done.append((form_groups(), None))
            except BaseException as e:  # re-raised below, in the caller's thread
                done.append((None, e))

        thread = threading.Thread(target=run, name="vlserve-groups", daemon=True)
        thread.start()
        while thread.is_alive():
            self.check_starting_workers()
            thread.join(JOIN_POLL_S)
        result, error = done[0]
        if error is not None:
            self.check_starting_workers()  # a peer's death is the cause to report, not the socket it closed
            raise error
        return result

    def check_starting_workers(self) -> None:
        for rank, worker in enumerate(self.workers, start=1):
            if not worker.is_alive():
                raise EngineDeadError(f"rank {rank} ({worker.name}) exited while starting (code {worker.exitcode}); "
                                      "nothing else was loaded")

    @property
    def vision_cache(self):
        return self.runner.vision_cache

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def call(self, method: str, *args):
        """Every rank runs runner.<method>(*args); returns rank 0's result."""
        self.check_workers()
        with self.collective():
            self.broadcast_call(method, args)
            return getattr(self.runner, method)(*args)

    def broadcast_call(self, method: str, args: tuple) -> None:
        packed_step.send_call(self.control)
        dist.broadcast_object_list([(method, args)], src=0, group=self.control)

    @contextlib.contextmanager
    def collective(self):
        try:
            yield
        except EngineDeadError:
            self.broken = True
            raise
        except BaseException as e:
            self.broken = True  # the workers may be waiting in a collective rank 0 will never join
            dead = self.exited_worker(EXIT_SEEN_S)  # a peer that died shows first as a closed socket
            if dead is not None:
                raise worker_exited(dead) from e
            raise

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.call("allocate_kv_cache", num_blocks)

    def profile_free_blocks(self, *args) -> int:
        free = self.call("profile_free_blocks", *args)
        with self.collective():
            return min_across_ranks(free, self.control)

    def encode_spread(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Vision data mode: the first stage's ranks each encode a share of the step's new media (balanced by
        patch count); rank 0 gathers the embeddings."""
        if self.tp == 1 or len(items) < 2:
            return self.runner.model.encode_media(items)
        owner = balanced_owners([item.pixel_values.shape[0] for item in items], self.tp)
        shares = [[item for item, o in zip(items, owner) if o == rank] for rank in range(self.tp)]
        mine = self.call("encode_share", shares)
        gathered = [None] * dist.get_world_size()
        with self.collective():
            dist.gather_object([], gathered, dst=0, group=self.control)
        gathered[0] = mine
        parts = [iter(g) for g in gathered]
        return [next(parts[o]).to(self.runner.device) for o in owner]

    def encode_all(self, items: list[MediaItem]) -> list[torch.Tensor]:
        """Vision weights mode: the first stage's ranks each hold a slice of the tower and run it together on all
        of the step's new media; rank 0 keeps the embeddings."""
        if self.tp == 1 or not items:
            return self.runner.model.encode_media(items)
        return self.call("encode_all", items)

    def submit(self, scheduled, departed=()):
        """Starts a step on every rank; rank 0 returns once its own stage is done (see ModelRunner.launch)."""
        step, rows = self.runner.prepare(scheduled, departed)
        self.check_workers()
        with self.collective():
            packed_step.send_step(step, self.control, self.runner.device)
            return rows, self.runner.launch(step)

    def wait(self, handle) -> StepResult:
        """Rank 0 samples once the step's logits are here (from the last stage under pipeline parallel)."""
        rows, pending = handle
        with self.collective():
            logits = self.runner.collect(pending)
        return self.runner.wait(self.runner.sample(logits, rows))

    def check_workers(self) -> None:
        dead = self.exited_worker()
        if dead is not None:
            raise worker_exited(dead)

    def exited_worker(self, within_s: float = 0.0):
        """A worker that has exited, looking for up to `within_s`; None if all run."""
        deadline = time.monotonic() + within_s
        while True:
            dead = next((w for w in self.workers if not w.is_alive()), None)
            if dead is not None or time.monotonic() >= deadline:
                return dead
            time.sleep(JOIN_POLL_S)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.shutdown)  # which held this runner, and so the model, alive
        told = False
        if not self.broken and all(w.is_alive() for w in self.workers):
            with contextlib.suppress(Exception):  # the group may break under us: then stop them as below
                self.broadcast_call("shutdown", ())
                told = True
        if not told:  # a broken group: stop the survivors rather than wait on a collective
            for worker in self.workers:
                worker.kill()
        for worker in self.workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        reset()
