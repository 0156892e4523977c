"""The plan: every (TP, PP) layout the hardware allows, each checked and sized; the best one chosen, and for a
deployment that cannot work, each problem with the change that fixes it.

Knobs the user did not set (EngineConfig.tunable: the layout, the vision tower's tensor-parallel mode,
--max-num-batched-tokens, max_pixels, --gpu-memory-utilization, --max-num-seqs) are tightened one step at a time
until the model fits with a useful context; what the user set is only checked. Each candidate lists the values it
changed. The engine runs the same plan before loading (preflight.py): it adopts the changed values of the knobs
`vlserve serve` was not given (its layout always as given), then checks the result.
"""

import math
from dataclasses import dataclass, field, replace

from vlserve.config import TUNABLE, EngineConfig, ModelConfig, choose_dtype
from vlserve.plan import checks
from vlserve.plan.cards import Card
from vlserve.plan.checks import Problem
from vlserve.plan.inventory import Inventory, Node
from vlserve.plan.memory import (
    GIB,
    MIB,
    Step,
    Weights,
    activation_bytes,
    image_patches,
    image_tokens,
    kv_bytes_per_block,
    reserve_bytes,
    stages,
)

MIN_CONTEXT = 8192  # without --max-model-len, a plan should hold at least this much of one conversation
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
PIXELS_PER_TOKEN = 28 * 28
# One knob tightened per step, cheapest first; a step is skipped when the user set that knob. Fewer seats
# (--max-num-seqs) shrink the logits and the sampler's temporaries, which grow with seats x vocabulary.
LADDER = (("mm_encoder_tp_mode", "weights"), ("max_num_batched_tokens", 4096), ("max_pixels", 4096 * PIXELS_PER_TOKEN),
          ("max_num_batched_tokens", 2048), ("gpu_memory_utilization", 0.95), ("max_num_seqs", 128),
          ("max_pixels", 1024 * PIXELS_PER_TOKEN), ("max_num_seqs", 64), ("max_num_batched_tokens", 1024),
          ("max_pixels", 256 * PIXELS_PER_TOKEN), ("max_num_seqs", 32))
KNOB_ORDER = ("mm_encoder_tp_mode", "max_num_batched_tokens", "max_pixels", "gpu_memory_utilization", "max_num_seqs")
LARGEST_SEARCH = 64  # GPUs tried when looking for the smallest count that fits
CPU_MEMORY_SHARE = 0.9  # of the memory free, what a CPU engine may take (the rest: the server, the OS)


@dataclass(frozen=True)
class Settings:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    mm_encoder_tp_mode: str
    max_num_batched_tokens: int
    max_pixels: int
    gpu_memory_utilization: float
    max_num_seqs: int
    step: int = 0  # how many knobs the planner tightened

    @property
    def world(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def changes(self, base: "Settings") -> tuple[tuple[str, object, object], ...]:
        """(knob, configured value, this value) of each knob, but the layout, that differs from `base`."""
        return tuple((k, getattr(base, k), getattr(self, k)) for k in KNOB_ORDER if getattr(base, k) != getattr(self, k))



@dataclass
class StageMemory:
    """One rank of a stage (ranks of a stage differ only in their card)."""

    stage: int
    device: str
    capacity: int  # the card's memory, or the machine's on a CPU plan
    weights: int
    activation: int
    reserve: int
    kv_per_block: int
    kv_cache: int = 0

    @property
    def model(self) -> int:
        """Everything but the KV cache."""
        return self.weights + self.activation + self.reserve

    @property
    def total(self) -> int:
        return self.model + self.kv_cache


@dataclass
class Candidate:
    settings: Settings
    dtype: str = ""
    dtype_why: str = ""
    errors: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    memory: list[StageMemory] = field(default_factory=list)
    kv_blocks: int = 0
    kv_tokens: int = 0
    max_model_len: int = 0
    machines: int = 1
    overshoot: float = 0.0  # bytes over the budget on the tightest rank (when it does not fit)
    changes: tuple[tuple[str, object, object], ...] = ()  # (knob, configured, planned) of each knob it changed

    @property
    def feasible(self) -> bool:
        return not self.errors


@dataclass
class Plan:
    cfg: ModelConfig
    inventory: Inventory
    engine: EngineConfig  # as configured; the chosen candidate's changes say what the plan changed
    chosen: Candidate
    layouts: list[Candidate]  # the best candidate of every (TP, PP) pair considered

    @property
    def feasible(self) -> bool:
        return self.chosen.feasible


class Planner:
    def __init__(self, cfg: ModelConfig, inventory: Inventory, engine: EngineConfig):
        self.cfg, self.inventory, self.engine = cfg, inventory, engine
        self.fixed = TUNABLE - engine.tunable  # knobs the user set: only checked
        self.weights = Weights(cfg)
        asked_len = self.engine.max_model_len
        self.target_len = asked_len or cfg.max_position_embeddings
        self.required_len = asked_len or min(cfg.max_position_embeddings, MIN_CONTEXT)

    # ---- layouts ----
    def layouts(self) -> list[tuple[int, int]]:
        asked, e = self.fixed, self.engine
        gpus = 1 if self.inventory.is_cpu else self.inventory.num_gpus
        tps = [e.tensor_parallel_size] if "tensor_parallel_size" in asked else range(1, gpus + 1)
        pairs = []
        for tp in tps:
            pps = [e.pipeline_parallel_size] if "pipeline_parallel_size" in asked else range(1, max(1, gpus // tp) + 1)
            pairs += [(tp, pp) for pp in pps]
        return pairs

    def configured(self, tp: int, pp: int) -> Settings:
        """The knobs as the engine's configuration has them, on this layout."""
        e = self.engine
        model_len = e.max_model_len or self.cfg.max_position_embeddings
        return Settings(tp, pp, e.mm_encoder_tp_mode, e.batched_tokens(model_len), e.media.max_pixels,
                        e.gpu_memory_utilization, e.max_num_seqs)

    def ladder(self, tp: int, pp: int) -> list[Settings]:
        e, asked = self.engine, self.fixed
        settings = [self.configured(tp, pp)]
        for knob, value in LADDER:
            current = getattr(settings[-1], knob)
            if knob in asked or value == current:
                continue
            if knob == "gpu_memory_utilization" and (value < current or self.inventory.is_cpu):
                continue
            if knob == "mm_encoder_tp_mode" and (tp == 1 or checks.vision_split(self.cfg, tp, value)):
                continue
            if knob == "max_pixels" and (self.cfg.vision is None or value > current):
                continue
            if knob == "max_num_batched_tokens" and (value > current or not e.enable_chunked_prefill):
                continue
            if knob == "max_num_seqs" and value > current:
                continue
            settings.append(replace(settings[-1], **{knob: value}, step=len(settings)))
        return settings

    def best_for(self, tp: int, pp: int) -> Candidate:
        """The first step of the ladder that fits with the required context; else the roomiest that fits; else
        the one closest to fitting, whose errors say why."""
        tried = []
        for settings in self.ladder(tp, pp):
            candidate = self.candidate(settings)
            if candidate.feasible and candidate.kv_tokens >= self.required_len:
                return self.other_vision_mode(candidate)
            tried.append(candidate)
            if not candidate.feasible and candidate.memory == []:
                break  # a structural problem: no knob below fixes it
        fitting = [c for c in tried if c.feasible]
        if fitting:
            return max(fitting, key=lambda c: c.kv_tokens)
        return min(tried, key=lambda c: (not c.memory, c.overshoot))

    def other_vision_mode(self, fits: Candidate) -> Candidate:
        """The vision tower split over the TP ranks (weights) frees memory for the KV cache that a whole tower per
        rank (data) holds: when the user left the mode open, the one with the larger KV cache."""
        s = fits.settings
        if "mm_encoder_tp_mode" in self.fixed or s.tensor_parallel_size == 1 or self.cfg.vision is None:
            return fits
        mode = "weights" if s.mm_encoder_tp_mode == "data" else "data"
        other = self.candidate(replace(s, mm_encoder_tp_mode=mode))
        return other if other.feasible and other.kv_tokens > fits.kv_tokens else fits

    # ---- one candidate ----
    def candidate(self, s: Settings) -> Candidate:
        c = Candidate(s, changes=s.changes(self.configured(s.tensor_parallel_size, s.pipeline_parallel_size)))
        cfg, tp, pp = self.cfg, s.tensor_parallel_size, s.pipeline_parallel_size
        partition = self.partition(pp)
        placed, where = checks.placement(self.inventory, tp, pp)
        cards = [stage_cards for _, stage_cards in placed]
        found = [checks.quantization(cfg, self.engine.quantization),
                 checks.tensor_parallel(cfg, tp, s.mm_encoder_tp_mode),
                 checks.awq_alignment(cfg, tp), checks.vision_split(cfg, tp, s.mm_encoder_tp_mode),
                 checks.pipeline_parallel(cfg, pp, partition), where]
        used = list(dict.fromkeys(card for stage in cards for card in stage))
        found += [checks.card_supported(card) for card in used]
        c.errors = [p for p in found if p]
        if c.errors:
            return c
        c.machines = len({machine for machine, _ in placed})
        weakest = min(used, key=lambda card: card.capability) if used else None
        self.choose_dtype(c, weakest)
        self.size_memory(c, cards)
        self.check_context(c)
        self.add_notes(c, weakest)
        padding = checks.awq_padding(cfg, tp)
        if padding:
            c.notes.append(padding)
        return c

    def partition(self, pp: int) -> tuple[int, ...] | None:
        """--pp-layer-partition, for the stage count it was given for; other counts split evenly."""
        partition = self.engine.pp_layer_partition
        return partition if partition and len(partition) == pp else None

    def choose_dtype(self, c: Candidate, weakest: Card | None) -> None:
        capability = weakest.capability if weakest else None
        c.dtype, c.dtype_why = choose_dtype(self.engine.dtype, capability, weakest.name if weakest else "the CPU",
                                            self.cfg.torch_dtype)
        if weakest and not weakest.bf16 and self.engine.dtype in ("auto", "bfloat16"):
            c.notes.append(Problem("bf16_unsupported", c.dtype_why))

    def size_memory(self, c: Candidate, cards: list[list[Card]]) -> None:
        cfg, e, s = self.cfg, self.engine, c.settings
        b, on_gpu = DTYPE_BYTES[c.dtype], not self.inventory.is_cpu
        split = s.mm_encoder_tp_mode == "weights" and s.tensor_parallel_size > 1
        tp = s.tensor_parallel_size
        patches = image_patches(s.max_pixels, cfg.vision) if cfg.vision else 0
        step = Step(s.max_num_batched_tokens, s.max_num_seqs, patches)
        for stage, stage_cards in zip(stages(cfg, s.pipeline_parallel_size, self.partition(s.pipeline_parallel_size)),
                                      cards):
            weights = self.weights.rank_bytes(tp, stage, split, b)
            sizes = (weights, activation_bytes(cfg, tp, stage, step, split, b, on_gpu=on_gpu),
                     reserve_bytes(on_gpu, s.world, weights), kv_bytes_per_block(cfg, tp, len(stage.layers),
                                                                                 e.block_size, b))
            if on_gpu:
                c.memory += [StageMemory(stage.index, card.name, card.memory_bytes, *sizes)
                             for card in dict.fromkeys(stage_cards)]
            else:
                c.memory.append(StageMemory(stage.index, "CPU", self.inventory.nodes[0].memory_bytes, *sizes))
        c.kv_blocks = self.kv_blocks(c.memory, s) if on_gpu else self.cpu_kv_blocks(c.memory, s)
        for row in c.memory:
            row.kv_cache = max(c.kv_blocks, 0) * row.kv_per_block
        c.kv_tokens = max(c.kv_blocks, 0) * e.block_size
        self.check_memory(c, on_gpu)

    def kv_blocks(self, rows: list[StageMemory], s: Settings) -> int:
        """As the engine's profiling step: rank 0's bytes per block, the smallest budget of all ranks."""
        if self.engine.num_gpu_blocks_override is not None:
            return self.engine.num_gpu_blocks_override
        return min(math.floor(r.capacity * s.gpu_memory_utilization - r.weights - r.activation - r.reserve)
                   // r.kv_per_block for r in rows)

    def cpu_kv_blocks(self, rows: list[StageMemory], s: Settings) -> int:
        """The CPU engine allocates exactly this (it runs this plan): --num-gpu-blocks-override, else
        --kv-cache-memory-gib's worth, else what --max-num-seqs sequences of the target length need, at most
        CPU_MEMORY_SHARE of the memory free once every rank's weights and activations are in."""
        e, per_block = self.engine, rows[0].kv_per_block
        if e.num_gpu_blocks_override is not None:
            return e.num_gpu_blocks_override
        if e.kv_cache_memory_gib is not None:
            return max(1, int(e.kv_cache_memory_gib * GIB) // per_block)
        ranks = s.tensor_parallel_size
        budget, model = cpu_budget(rows, ranks)
        fits = int((budget - model) // (ranks * sum(r.kv_per_block for r in rows)))
        return max(1, min(s.max_num_seqs * -(-self.target_len // e.block_size), fits))

    def check_memory(self, c: Candidate, on_gpu: bool) -> None:
        e, utilization = self.engine, c.settings.gpu_memory_utilization
        if not on_gpu:
            self.check_cpu_memory(c)
            return
        override = e.num_gpu_blocks_override is not None
        budgets = [r.capacity if override else r.capacity * utilization for r in c.memory]
        needs = [r.model + (r.kv_cache if override else r.kv_per_block) for r in c.memory]
        worst = max(range(len(needs)), key=lambda i: needs[i] - budgets[i])
        r, c.overshoot = c.memory[worst], needs[worst] - budgets[worst]
        if c.overshoot > 0:
            allows = "its memory" if override else f"--gpu-memory-utilization {utilization}"
            c.errors.append(Problem(
                "out_of_memory",
                f"stage {r.stage} on {r.device} needs {gib(needs[worst])} (weights {gib(r.weights)}, profiling peak "
                f"{gib(r.activation)}, {gib(r.reserve)} reserved, {'the KV cache' if override else 'a KV block'}"
                f"), over the {gib(budgets[worst])} that {allows} allows (\"CUDA out of memory\")"))
            return
        headroom, cache_mib = self.vision_cache_room(c, utilization)
        if not override and cache_mib is not None:
            c.errors.append(Problem(
                "vision_cache", f"the vision cache (--vision-cache-mib {e.vision_cache_mib}) lives outside the KV "
                f"budget, in the {gib(headroom)} that --gpu-memory-utilization {utilization} leaves on "
                f"{c.memory[0].device}: once it fills, the card runs out of memory",
                f"lower --vision-cache-mib to {cache_mib} or --gpu-memory-utilization"))

    def check_cpu_memory(self, c: Candidate) -> None:
        """All ranks share this machine's free memory, of which the engine may take CPU_MEMORY_SHARE."""
        ranks, free = c.settings.tensor_parallel_size, c.memory[0].capacity
        budget, model = cpu_budget(c.memory, ranks)
        kv = ranks * sum(r.kv_cache for r in c.memory)
        c.overshoot = model + kv - budget
        if c.overshoot <= 0:
            return
        of = f"the {gib(budget)} vlserve may take of the {gib(free)} this machine has free"
        weights = gib(ranks * sum(r.weights for r in c.memory))
        if model > budget:
            c.errors.append(Problem("out_of_memory", f"the {c.dtype} weights ({weights}) and the profiling peak "
                                    f"need {gib(model)}, more than {of}", self.cpu_model_fix(c)))
        else:
            most = math.floor((budget - model) / GIB * 100) / 100
            c.errors.append(Problem(
                "out_of_memory", f"the {c.dtype} weights ({weights}), the profiling peak and the KV cache "
                f"({gib(kv)}) need {gib(model + kv)}, more than {of}",
                f"lower --kv-cache-memory-gib to {most} or leave it out (vlserve then sizes the KV cache to fit)"))

    def cpu_model_fix(self, c: Candidate) -> str:
        """A smaller dtype when one fits this machine, else more memory."""
        if c.dtype == "float32":
            halved = Planner(self.cfg, self.inventory, replace(self.engine, dtype="bfloat16"))
            fits = halved.best_for(c.settings.tensor_parallel_size, c.settings.pipeline_parallel_size)
            if fits.feasible:
                return f"--dtype bfloat16 halves the weights and fits (KV cache {fits.kv_tokens:,} tokens)"
        return "use a GPU or a machine with more memory"

    def vision_cache_room(self, c: Candidate, utilization: float) -> tuple[float, int | None]:
        """The memory `utilization` leaves on the first card, where the vision cache lives, and the
        --vision-cache-mib that fits in it when the configured one does not (None when it does)."""
        headroom = c.memory[0].capacity * (1 - utilization)
        fits = self.engine.vision_cache_mib * MIB <= headroom
        return headroom, None if fits else int(headroom // MIB * 0.8)

    def check_context(self, c: Candidate) -> None:
        asked, limit = self.engine.max_model_len, self.cfg.max_position_embeddings
        if not c.feasible:
            return
        c.max_model_len = asked or min(limit, c.kv_tokens)
        if asked and asked > limit:
            c.errors.append(Problem("max_model_len_over_model", f"--max-model-len {asked} exceeds the "
                                    f"{limit} positions the model was trained for (max_position_embeddings)",
                                    f"use --max-model-len {limit} or less"))
        elif asked and asked > c.kv_tokens:
            c.errors.append(Problem(
                "max_model_len_exceeds_kv_cache", f"--max-model-len {asked} is larger than the KV cache: "
                f"{c.kv_tokens} tokens fit (\"max seq len is larger than the maximum number of tokens that can be "
                "stored in KV cache\")", self.context_fix(c, asked)))

    def context_fix(self, c: Candidate, asked: int) -> str:
        fits = f"--max-model-len {c.kv_tokens} is the largest that fits" if c.kv_tokens > 0 else ""
        blocks = -(-asked // self.engine.block_size)
        sized = self.engine.kv_cache_memory_gib is None and self.engine.num_gpu_blocks_override is None
        if self.inventory.is_cpu and sized:  # the KV cache has all the memory left: only the weights can shrink
            return f"{fits}; {self.cpu_model_fix(c)}" if fits else self.cpu_model_fix(c)
        if self.inventory.is_cpu or self.engine.num_gpu_blocks_override is not None:
            flag = "--num-gpu-blocks-override" if self.engine.num_gpu_blocks_override is not None else \
                "--kv-cache-memory-gib"
            value = blocks if flag.endswith("override") else math.ceil(blocks * c.memory[0].kv_per_block / GIB * 100) / 100
            return f"{fits}; {flag} {value} would hold {asked}"
        need = max((r.model + blocks * r.kv_per_block) / r.capacity for r in c.memory)
        utilization = math.ceil(need * 100) / 100
        if utilization > 1:
            return f"{fits}; no --gpu-memory-utilization holds {asked} on these cards: use more GPUs"
        fix = f"--gpu-memory-utilization {utilization:.2f}"
        _, cache_mib = self.vision_cache_room(c, utilization)
        if cache_mib is not None:
            fix += f" --vision-cache-mib {cache_mib}"
        return f"{fits}; {fix} would hold {asked} on these cards"

    def add_notes(self, c: Candidate, weakest: Card | None) -> None:
        cfg, s = self.cfg, c.settings
        backend = weakest and checks.attention_backend(weakest)
        if backend:
            c.notes.append(backend)
        if c.machines > 1:
            c.notes.append(Problem("network", f"the plan spans {c.machines} machines: each binds Gloo and NCCL to the "
                                   "interface that routes to the head (`vlserve cluster join` does it; check with "
                                   "`vlserve doctor --head HOST:PORT` on each)"))
        largest = image_tokens(s.max_pixels, cfg.vision) if cfg.vision else 0
        if cfg.vision and c.feasible and largest >= c.max_model_len:
            c.notes.append(Problem("image_over_context", f"one image of the largest allowed size is {largest} "
                                   f"tokens, not under max_model_len {c.max_model_len}: such prompts are refused",
                                   "lower max_pixels with --mm-processor-kwargs"))


def cpu_budget(rows: list[StageMemory], ranks: int) -> tuple[float, int]:
    """On a CPU plan (every rank on one machine): what the engine may take of the memory free, and what the ranks'
    weights, activations and reserves take of it."""
    return rows[0].capacity * CPU_MEMORY_SHARE, ranks * sum(r.model for r in rows)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def rank_key(planner: Planner, c: Candidate) -> tuple:
    """Fits the asked length (or the model's) with the fewest GPUs, then the fewest stages (TP is faster per
    request than PP) and the fewest knobs tightened; if nothing reaches it, the largest KV cache."""
    reaches = c.kv_tokens >= planner.target_len
    return (c.feasible, c.kv_tokens >= planner.required_len, reaches, -c.settings.world if reaches else c.kv_tokens,
            -c.settings.step, -c.settings.pipeline_parallel_size, c.kv_tokens)


def make_plan(cfg: ModelConfig, inventory: Inventory, engine: EngineConfig) -> Plan:
    """The plan for `engine` on `inventory`: engine.tunable says which knobs it may change."""
    planner = Planner(cfg, inventory, engine)
    layouts = [planner.best_for(tp, pp) for tp, pp in planner.layouts()]
    feasible = [c for c in layouts if c.feasible]
    if feasible:
        chosen = max(feasible, key=lambda c: rank_key(planner, c))
    else:  # the one closest to working: sized (no structural problem), least over its budget
        chosen = max(layouts, key=lambda c: (bool(c.memory), -c.overshoot, -c.settings.step))
        add_fixes(planner, chosen)
    return Plan(cfg, inventory, engine, chosen, layouts)


STRUCTURAL = ("tp_heads", "awq_group_alignment", "vision_tp", "gpus")
MEMORY = ("out_of_memory", "max_model_len_exceeds_kv_cache", "vision_cache")


def add_fixes(planner: Planner, chosen: Candidate) -> None:
    """Completes each error's fix with what the plan knows: a layout that works here, or the hardware that would."""
    for i, problem in enumerate(chosen.errors):
        if problem.code in STRUCTURAL:
            extra = alternative(planner, chosen.settings.world)
        elif problem.code in MEMORY and not planner.inventory.is_cpu:
            extra = smallest_hardware(planner)
        else:
            continue
        chosen.errors[i] = replace(problem, fix="; ".join(filter(None, (problem.fix, extra))))


def alternative(planner: Planner, world: int) -> str:
    """A layout that works on these machines: on the same number of GPUs if one does (pipeline stages instead of
    tensor-parallel ranks), else on any; else the hardware that would hold the model."""
    free = Planner(planner.cfg, planner.inventory, with_open_layout(planner.engine))
    free.weights = planner.weights
    same = [free.best_for(tp, world // tp) for tp in range(1, world + 1) if world % tp == 0]
    fits = [c for c in same if c.feasible] or [c for c in (free.best_for(*x) for x in free.layouts()) if c.feasible]
    if not fits:
        return smallest_hardware(planner)
    best = max(fits, key=lambda c: rank_key(free, c))
    return f"{layout_flags(best)} works here (KV cache {best.kv_tokens:,} tokens)"


def with_open_layout(engine: EngineConfig) -> EngineConfig:
    """The same engine on any layout: what-if plans for other GPU counts."""
    return replace(engine, tunable=engine.tunable | {"tensor_parallel_size", "pipeline_parallel_size"})


def layout_flags(c: Candidate) -> str:
    s = c.settings
    return f"-tp {s.tensor_parallel_size} -pp {s.pipeline_parallel_size}"


def smallest_hardware(planner: Planner) -> str:
    """The fewest cards like this inventory's smallest that would hold the model, in machines of its size."""
    card = min((g for node in planner.inventory.nodes for g in node.gpus), key=lambda g: g.memory_bytes)
    per_node = max(max(len(node.gpus) for node in planner.inventory.nodes), 8)
    for count in range(1, LARGEST_SEARCH + 1):
        nodes = tuple(Node(f"node{i}", (card,) * min(per_node, count - i * per_node))
                      for i in range(-(-count // per_node)))
        what_if = Planner(planner.cfg, Inventory(nodes, f"{count} x {card.name}"), with_open_layout(planner.engine))
        what_if.weights = planner.weights  # same model: reuse the sized tensors
        fits = [c for c in (what_if.best_for(tp, count // tp) for tp in range(1, min(count, per_node) + 1)
                            if count % tp == 0) if c.feasible and c.kv_tokens >= planner.required_len]
        if fits:
            best = max(fits, key=lambda c: rank_key(what_if, c))
            return f"it needs at least {count} x {card.name} ({layout_flags(best)}, KV cache {best.kv_tokens:,} tokens)"
    return f"more than {LARGEST_SEARCH} x {card.name} would be needed"
