"""Linear layers split over the tensor-parallel group.

Each parameter carries a `weight_loader(param, loaded, name, shard_id)` that reads only this rank's rows or
columns from `loaded` (a torch tensor or a lazy safetensors slice), so a rank never materialises whole tensors.
"""

import torch
import torch.nn.functional as F
from torch import nn

from vlserve.distributed.parallel_state import tp_all_reduce, tp_rank, tp_size
from vlserve.errors import CheckpointError


def loaded_shape(loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def expect_shape(name: str, loaded, expected: tuple[int, ...]) -> None:
    got = loaded_shape(loaded)
    if got != tuple(expected):
        raise CheckpointError(f"tensor {name} has shape {list(got)} in the checkpoint, the model expects "
                              f"{list(expected)}; the checkpoint does not match its config.json")


def copy_into(param: torch.Tensor, loaded) -> None:
    with torch.no_grad():
        param.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded[:])


def default_weight_loader(param: nn.Parameter, loaded, name: str, shard_id=None) -> None:
    expect_shape(name, loaded, param.shape)
    copy_into(param, loaded)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: tuple[int, int] | None):
        super().__init__()
        self.tp_rank, self.tp_size = tp if tp is not None else (tp_rank(), tp_size())
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; no communication. `tp=(0, 1)` keeps a layer whole (vision data mode)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: tuple[int, int] | None = None):
        rank_size = tp if tp is not None else (tp_rank(), tp_size())
        if out_features % rank_size[1]:
            raise CheckpointError(f"{out_features} output features do not split over {rank_size[1]} ranks")
        super().__init__(in_features, out_features // rank_size[1], bias, tp)
        self.full_out = out_features

    def weight_loader(self, param, loaded, name, shard_id=None):
        full = (self.full_out, *param.shape[1:])
        expect_shape(name, loaded, full)
        n = param.shape[0]
        copy_into(param, loaded[self.tp_rank * n:(self.tp_rank + 1) * n])


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored in one weight (gate and up projections)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp=None):
        super().__init__(in_features, sum(out_sizes), bias, tp)
        self.out_sizes = out_sizes

    def weight_loader(self, param, loaded, name, shard_id=None):
        full, per = self.out_sizes[shard_id], self.out_sizes[shard_id] // self.tp_size
        expect_shape(name, loaded, (full, *param.shape[1:]))
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        copy_into(param.narrow(0, offset, per), loaded[self.tp_rank * per:(self.tp_rank + 1) * per])


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value heads in one weight. With fewer KV heads than ranks, KV heads are replicated."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = True, tp=None):
        rank, size = tp if tp is not None else (tp_rank(), tp_size())
        self.num_heads = num_heads // size
        self.num_kv_heads = max(1, num_kv_heads // size)
        self.head_dim = head_dim
        self.total = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        LinearBase.__init__(self, hidden, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias, (rank, size))

    def weight_loader(self, param, loaded, name, shard_id=None):
        if shard_id is None:  # one fused q|k|v tensor (the vision tower's `qkv`)
            rows = loaded_shape(loaded)[0] // 3
            for i, part in enumerate("qkv"):
                self.weight_loader(param, loaded[i * rows:(i + 1) * rows], name, part)
            return
        local = self.num_heads if shard_id == "q" else self.num_kv_heads
        expect_shape(name, loaded, (self.total[shard_id] * self.head_dim, *param.shape[1:]))
        if shard_id == "q":
            first_head, offset = self.tp_rank * local, 0
        else:  # rank r uses KV head r * kv // tp: each KV head serves the query heads of its group
            first_head = self.tp_rank * self.total["k"] // self.tp_size
            offset = self.num_heads + (self.num_kv_heads if shard_id == "v" else 0)
        d = self.head_dim
        copy_into(param.narrow(0, offset * d, local * d), loaded[first_head * d:(first_head + local) * d])


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs summed with one all-reduce, bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp=None):
        rank_size = tp if tp is not None else (tp_rank(), tp_size())
        if in_features % rank_size[1]:
            raise CheckpointError(f"{in_features} input features do not split over {rank_size[1]} ranks")
        super().__init__(in_features // rank_size[1], out_features, bias, tp)
        self.full_in = in_features

    def weight_loader(self, param, loaded, name, shard_id=None):
        if param.dim() == 1:  # bias: whole on every rank
            return default_weight_loader(param, loaded, name)
        expect_shape(name, loaded, (param.shape[0], self.full_in))
        n = param.shape[1]
        copy_into(param, loaded[:, self.tp_rank * n:(self.tp_rank + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = tp_all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y
