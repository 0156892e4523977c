"""The planner's checks on the live hardware, run by the engine before it reads any weights (`vlserve serve`,
`LLM(...)`): the same plan as `vlserve plan`, with every knob as configured, plus torch's arch list per card."""

import logging

import torch

from vlserve.config import EngineConfig, ModelConfig
from vlserve.errors import ClusterError, PlanError
from vlserve.plan.checks import kernel_image
from vlserve.plan.inventory import Inventory, Node, cpu_inventory, ray_inventory, this_node
from vlserve.plan.planner import Plan, Request, make_plan

log = logging.getLogger("vlserve.plan")


def check_before_loading(cfg: ModelConfig, config: EngineConfig, device: torch.device) -> Plan:
    """Raises PlanError naming every problem with its fix; logs the notes (the dtype fallback, ...). Returns the
    plan, whose KV cache size a CPU engine allocates."""
    hardware = live_inventory(config, device)
    plan = make_plan(cfg, hardware, Request(config))
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
