"""The planner on the live hardware, run before the engine reads any weights (`vlserve serve`, `LLM(...)`):
`settle` gives the knobs the user left unset the values `vlserve plan` would (so both agree), and
`check_before_loading` checks the settled configuration, plus torch's arch list per card."""

import logging
from dataclasses import replace

import torch

from vlserve.config import EngineConfig, ModelConfig
from vlserve.errors import ClusterError, PlanError
from vlserve.plan.checks import kernel_image
from vlserve.plan.inventory import Inventory, Node, cpu_inventory, ray_inventory, this_node
from vlserve.plan.planner import Plan, make_plan
from vlserve.plan.report import changes_text

log = logging.getLogger("vlserve.plan")


def settle(config: EngineConfig) -> EngineConfig:
    """`config` with its tunable knobs at the plan's values, logged where they differ; then nothing is tunable.
    The layout stays as configured. A plan that cannot work changes nothing: check_before_loading says why."""
    if not config.tunable:
        return config
    fixed = replace(config, tunable=config.tunable - {"tensor_parallel_size", "pipeline_parallel_size"})
    plan = make_plan(ModelConfig.from_dir(config.model), live_inventory(config, config.resolved_device()), fixed)
    settled = replace(config, tunable=frozenset())
    if not plan.feasible or not plan.chosen.changes:
        return settled
    values = {knob: new for knob, _, new in plan.chosen.changes}
    media = replace(config.media, max_pixels=values.pop("max_pixels", config.media.max_pixels))
    log.warning("to fit this hardware, as `vlserve plan` would: %s (set these flags to choose otherwise)",
                changes_text(plan.chosen))
    return replace(settled, media=media, **values)


def check_before_loading(cfg: ModelConfig, config: EngineConfig, device: torch.device) -> Plan:
    """Raises PlanError naming every problem with its fix; logs the notes (the dtype fallback, ...). Returns the
    plan, whose KV cache size a CPU engine allocates."""
    hardware = live_inventory(config, device)
    plan = make_plan(cfg, hardware, replace(config, tunable=frozenset()))  # what runs: settle() came first
    problems = list(plan.chosen.errors)
    if device.type == "cuda":
        local = [card for node in hardware.nodes[:1] for card in node.gpus]
        problems += [p for p in (kernel_image(card, torch.cuda.get_arch_list()) for card in local) if p]
    for note in plan.chosen.notes:
        log.warning("%s", note)
    if problems:
        raise PlanError("\n".join(map(str, dict.fromkeys(problems))))
    return plan


def live_inventory(config: EngineConfig, device: torch.device) -> Inventory:
    """The cards the ranks will get: this machine's (from the engine's device on), or the Ray cluster's when the
    ranks go there."""
    world = config.world_size
    if device.type != "cuda":
        return cpu_inventory()
    node = this_node()
    if config.distributed_executor_backend == "ray" or (config.distributed_executor_backend is None
                                                         and world > len(node.gpus)):
        try:
            return ray_inventory()
        except (ImportError, ClusterError):
            pass  # no cluster to ask: the plan sizes this machine, whose GPU count it then names
    first = device.index or 0
    return Inventory((Node(node.name, node.gpus[first:], node.memory_bytes),), "this machine")
