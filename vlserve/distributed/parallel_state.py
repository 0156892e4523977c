"""Where this process sits: its tensor-parallel group and its pipeline stage.

Until groups are set up, every layer runs as rank 0 of 1 in the only stage. Global rank r holds stage
r // tp_size and tensor-parallel rank r % tp_size.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


@dataclass
class PipelineStage:
    stage: int = 0
    num_stages: int = 1
    prev_rank: int | None = None  # global rank of the same tensor-parallel rank in the previous stage
    next_rank: int | None = None
    layer_partition: tuple[int, ...] | None = None  # --pp-layer-partition; None: an even split

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


_TP = TensorParallelGroup()
_PP = PipelineStage()


def set_tp_group(group: TensorParallelGroup) -> None:
    global _TP
    _TP = group


def set_pipeline_stage(stage: PipelineStage) -> None:
    global _PP
    _PP = stage


def reset() -> None:
    """Back to one process: whole layers, one stage."""
    set_tp_group(TensorParallelGroup())
    set_pipeline_stage(PipelineStage())


def tp_rank() -> int:
    return _TP.rank


def tp_size() -> int:
    return _TP.size


def pipeline_stage() -> PipelineStage:
    return _PP


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size > 1:
        dist.all_reduce(x, group=_TP.group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)



