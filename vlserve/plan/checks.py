"""One check per known deployment failure that the model's shape and the cards decide (the catalogue in
docs/troubleshooting.md). Each returns a Problem (what is wrong, and the fix) or None. Memory problems, which need
the whole plan, are raised by planner.py."""

import re
from dataclasses import dataclass

from vlserve.errors import ConfigError
from vlserve.config import ModelConfig, valid_tensor_parallel_sizes, valid_vision_tensor_parallel_sizes
from vlserve.plan.cards import OLDEST_SUPPORTED, Card
from vlserve.plan.inventory import Inventory
from vlserve.model.quantization import PACK, QuantConfig, mlp_width, readable


@dataclass(frozen=True)
class Problem:
    code: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


def joined(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) or "none"


def tensor_parallel_sizes(cfg: ModelConfig, vision_mode: str, up_to: int = 64) -> list[int]:
    """Sizes every check below accepts for this checkpoint: heads, KV heads, MLP, AWQ groups, the vision tower."""
    vision = valid_vision_tensor_parallel_sizes(cfg.vision, up_to) if cfg.vision and vision_mode == "weights" else None
    return [t for t in valid_tensor_parallel_sizes(cfg, up_to)
            if awq_misalignment(cfg, t) is None and (vision is None or t in vision)]


def tensor_parallel(cfg: ModelConfig, tp: int, vision_mode: str) -> Problem | None:
    """Attention heads, KV heads and the MLP must split evenly (the "heads not divisible by TP size" failure)."""
    heads, kv, mlp = cfg.num_attention_heads, cfg.num_key_value_heads, mlp_width(cfg, tp)  # AWQ: padded
    why = []
    if heads % tp:
        why.append(f"its {heads} attention heads do not divide by {tp}")
    if kv % tp and tp % kv:
        why.append(f"its {kv} KV heads neither divide by {tp} nor divide it (each rank needs whole KV heads)")
    if mlp % tp:
        why.append(f"its MLP width {mlp} does not divide by {tp}")
    if not why:
        return None
    return Problem("tp_heads", f"--tensor-parallel-size {tp} does not split this model: {'; '.join(why)}",
                   f"valid sizes: {joined(tensor_parallel_sizes(cfg, vision_mode))}")


def awq_misalignment(cfg: ModelConfig, tp: int) -> str | None:
    """AWQ and GPTQ store one scale per group of input features: a rank's share of o_proj's inputs must hold whole
    groups, and of a column-parallel layer whole int32 packs of 8 outputs. (The MLP vlserve pads: `awq_padding`.)"""
    quant = readable(cfg.quantization)
    if quant is None or tp == 1:
        return None
    group, width = quant.group_size, cfg.num_attention_heads * cfg.head_dim
    if width % tp == 0 and (width // tp) % group:
        return (f"its attention width {width} is {width / group:g} groups of {group}, so each of {tp} ranks would "
                f"get {width / group / tp:g} groups")
    kv = cfg.num_key_value_heads * cfg.head_dim
    if kv % tp == 0 and (kv // tp) % PACK:
        return f"each rank would get {kv // tp} of its KV width {kv}, not a multiple of {PACK} packed values"
    return None


def awq_alignment(cfg: ModelConfig, tp: int) -> Problem | None:
    """The "input size is not aligned with the quantized weight shape" failure, where padding cannot help."""
    why = awq_misalignment(cfg, tp)
    if why is None:
        return None
    return Problem("awq_group_alignment", f"--tensor-parallel-size {tp} does not split this quantized checkpoint: "
                   f"{why} (\"the input size is not aligned with the quantized weight shape\")",
                   f"tensor-parallel sizes that keep whole groups: {joined(tensor_parallel_sizes(cfg, 'data'))}; "
                   "split the layers with --pipeline-parallel-size instead")


def awq_padding(cfg: ModelConfig, tp: int) -> Problem | None:
    """A note where vlserve pads a quantized MLP to whole groups per rank (other engines refuse such a split)."""
    width = mlp_width(cfg, tp)
    if width == cfg.intermediate_size:
        return None
    quant = readable(cfg.quantization)
    group = quant.group_size
    width_groups = cfg.intermediate_size / group
    return Problem("awq_padding", f"the {quant.method.upper()} MLP width {cfg.intermediate_size} ({width_groups:g} "
                   f"groups of {group}) does not split into whole groups over {tp} ranks: vlserve pads it at load to "
                   f"{width} ({width // group // tp} groups a rank; zero weights and scales, counted in the memory "
                   "above)")


def vision_split(cfg: ModelConfig, tp: int, mode: str) -> Problem | None:
    """In --mm-encoder-tp-mode weights the vision tower's 16 heads and MLP are split over the ranks too."""
    if mode != "weights" or cfg.vision is None:
        return None
    valid = valid_vision_tensor_parallel_sizes(cfg.vision)
    if tp in valid:
        return None
    return Problem("vision_tp",
                   f"--tensor-parallel-size {tp} does not split the vision tower ({cfg.vision.num_heads} heads, MLP "
                   f"width {cfg.vision.intermediate_size}) in --mm-encoder-tp-mode weights",
                   f"sizes that split it: {joined(valid)}; or use --mm-encoder-tp-mode data (vision weights whole on "
                   "every rank)")


def pipeline_parallel(cfg: ModelConfig, pp: int, partition: tuple[int, ...] | None = None) -> Problem | None:
    if pp > cfg.num_hidden_layers:
        return Problem("pp_layers", f"--pipeline-parallel-size {pp} exceeds the model's {cfg.num_hidden_layers} "
                       "layers", f"use at most {cfg.num_hidden_layers} stages")
    if partition and sum(partition) != cfg.num_hidden_layers:
        return Problem("pp_partition", f"--pp-layer-partition {','.join(map(str, partition))} places "
                       f"{sum(partition)} layers, the model has {cfg.num_hidden_layers}",
                       f"give {pp} numbers that sum to {cfg.num_hidden_layers}, or leave it out for an even split")
    return None


def quantization(cfg: ModelConfig, flag: str | None = None) -> Problem | None:
    """The checkpoint's quantization is one vlserve reads, and --quantization (if given) names it."""
    q = cfg.quantization
    method = q.get("quant_method") if q else None
    if flag is not None and flag.lower() != str(method).lower():
        return Problem("quantization_flag", f"--quantization {flag} does not match the checkpoint: its config.json "
                       + (f"says quant_method {method!r}" if q else "has no quantization_config (its weights are not "
                          "quantized; vlserve does not quantize at load)"),
                       "drop --quantization: vlserve reads the method from config.json")
    try:
        QuantConfig.of(q, cfg.path)
    except ConfigError as e:
        return Problem("quantization", str(e), "use the bf16 checkpoint, or a 4-bit AWQ or GPTQ one")
    return None


def placement(inventory: Inventory, tp: int, pp: int) -> tuple[list[tuple[int, list[Card]]], Problem | None]:
    """(machine index, cards) of each stage: each tensor-parallel group inside one machine (its all-reduces run
    every layer; only pipeline hand-offs cross the network), machines filled in order, as the Ray executor places
    them. On a CPU plan every stage is on this machine, without cards."""
    world = tp * pp
    if inventory.is_cpu:
        return [(0, []) for _ in range(pp)], None
    if world > inventory.num_gpus:
        return [], Problem("gpus", f"{tp} x {pp} = {world} ranks need {world} GPUs; {inventory.source} has "
                           f"{inventory.num_gpus}", "lower -tp/-pp, or add machines (vlserve cluster join)")
    largest = max(len(node.gpus) for node in inventory.nodes)
    if tp > largest:
        return [], Problem("gpus", f"--tensor-parallel-size {tp} needs {tp} GPUs in one machine (a tensor-parallel "
                           f"group all-reduces every layer); the largest machine has {largest}",
                           f"use -tp {largest} or less and --pipeline-parallel-size across machines")
    free = [list(node.gpus) for node in inventory.nodes]
    stages = []
    for _ in range(pp):
        index = next((i for i, gpus in enumerate(free) if len(gpus) >= tp), None)
        if index is None:
            return [], Problem("gpus", f"{pp} stages of {tp} GPUs do not fit the machines of {inventory.source} "
                               "(each stage's GPUs sit in one machine)", "lower -pp or -tp")
        stages.append((index, free[index][:tp]))
        del free[index][:tp]
    return stages, None


def card_supported(card: Card) -> Problem | None:
    """Cards older than Turing: PyTorch's current CUDA builds and vlserve's kernels carry no code for them."""
    if card.capability >= OLDEST_SUPPORTED:
        return None
    have = ".".join(map(str, card.capability))
    return Problem("no_kernel_image", f"{card.name} has compute capability {have}; vlserve's kernels and PyTorch's "
                   "CUDA 13 builds start at 7.5, so it would fail with \"no kernel image is available for execution "
                   "on the device\"", "use cards of compute capability 7.5 or newer (T4, RTX 2080 Ti and up); "
                   "`vlserve doctor` compares torch.cuda.get_arch_list() with each card")


def kernel_image(card: Card, arch_list: list[str]) -> Problem | None:
    """Whether torch carries code for this card: a cubin of its major version and a minor not above its own (an
    'a' cubin only for exactly its own), or PTX of an older architecture, which the driver compiles."""
    major, minor = card.capability
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if not match:
            continue
        kind, arch_major, arch_minor, specific = match[1], int(match[2]), int(match[3]), bool(match[4])
        if kind == "sm" and arch_major == major and (arch_minor == minor or arch_minor < minor and not specific):
            return None
        if kind == "compute" and not specific and (arch_major, arch_minor) <= (major, minor):
            return None
    return Problem("no_kernel_image", f"this torch build carries code for {' '.join(arch_list) or 'no GPU'}, none "
                   f"of which runs on {card.name} (sm_{major}{minor}): every kernel would fail with \"no kernel image "
                   "is available for execution on the device\"",
                   f"install a torch build whose arch list has sm_{major}{minor} (the CUDA 12.x or 13.x wheels from "
                   "pytorch.org cover sm_75 and newer)")


def attention_backend(card: Card) -> Problem | None:
    """The "attention backend needs compute capability >= 8.0" failure cannot happen: the engine picks the kernel
    by the card. Said, so nobody goes looking for flash attention on an older card."""
    if card.flash_attention:
        return None
    return Problem("attention_backend", f"{card.name} predates flash attention (compute capability 8.0): prefill and "
                   "vision attention run in vlserve's Triton kernel instead (the same memory, linear in the tokens)")
