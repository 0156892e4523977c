"""Linear layers split over the tensor-parallel group, dense or 4-bit (AWQ's format, layers/awq.py, or GPTQ's,
layers/gptq.py).

Each parameter carries a `weight_loader(param, loaded, name, shard_id)` that reads only this rank's rows or
columns from `loaded` (a torch tensor or a lazy safetensors slice), so a rank never materialises whole tensors.
A layer may be wider than its checkpoint (`real_out` / `real_in`): a quantized MLP whose groups would not split
over the ranks is padded to whole groups per rank; the padding holds zero weights and zero scales, so it adds nothing.
"""

import torch
import torch.nn.functional as F
from torch import nn

from vlserve.distributed.parallel_state import tp_all_reduce, tp_rank, tp_size
from vlserve.errors import CheckpointError
from vlserve.model.layers import awq, gptq
from vlserve.model.quantization import PACK, QuantConfig


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


def stored_shape(kind: str, in_features: int, out_features: int, quant: QuantConfig | None = None
                 ) -> tuple[int, ...]:
    """How a layer of `in_features` x `out_features` stores each kind of tensor (dense, AWQ's or GPTQ's)."""
    g = quant.group_size if quant else 1
    gptq_rows = quant is not None and quant.method == "gptq"
    return {"weight": (out_features, in_features), "bias": (out_features,),
            "qweight": (in_features // PACK, out_features) if gptq_rows else (in_features, out_features // PACK),
            "qzeros": (in_features // g, out_features // PACK), "scales": (in_features // g, out_features),
            "g_idx": (in_features,)}[kind]


def out_axis(kind: str, quant: QuantConfig | None) -> tuple[int, int] | None:
    """(axis, features per element) of the outputs in a stored tensor of `kind`; None: it has none (g_idx)."""
    if kind in ("weight", "bias"):
        return 0, 1
    if kind == "g_idx":
        return None
    packed = kind == "qzeros" or (kind == "qweight" and quant.method == "awq")
    return 1, PACK if packed else 1


def in_axis(kind: str, quant: QuantConfig | None) -> tuple[int, int]:
    """(axis, features per element) of the inputs in a stored tensor of `kind` (not a bias)."""
    if kind == "weight":
        return 1, 1
    if kind == "qweight":
        return 0, PACK if quant.method == "gptq" else 1
    return 0, 1 if kind == "g_idx" else quant.group_size


def check_groups(name: str, loaded, group: int) -> None:
    """GPTQ's g_idx must be each input's own group (no act-order): the layers read groups in order."""
    g_idx = loaded if isinstance(loaded, torch.Tensor) else loaded[:]
    if not torch.equal(g_idx.long(), torch.arange(len(g_idx)) // group):
        raise CheckpointError(f"tensor {name} reorders the inputs' groups (act-order): vlserve reads GPTQ checkpoints "
                              "quantized with desc_act false")


def load_range(param: torch.Tensor, loaded, axis: int, unit: int, lo: int, hi: int, real: int, dst: int) -> None:
    """Copies features [lo, hi) along `axis` of the checkpoint tensor (those below `real`: the rest is padding,
    left zero) into `param` from feature `dst` on."""
    hi = min(hi, real)
    if hi <= lo:
        return
    index = (slice(None),) * axis + (slice(lo // unit, hi // unit),)
    copy_into(param.narrow(axis, dst // unit, (hi - lo) // unit), loaded[index])


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: tuple[int, int] | None,
                 quant: QuantConfig | None = None):
        """`in_features` x `out_features`: this rank's part."""
        super().__init__()
        self.tp_rank, self.tp_size = tp if tp is not None else (tp_rank(), tp_size())
        self.quant = quant
        kinds = {None: ("weight",), "awq": ("qweight", "qzeros", "scales"),
                 "gptq": ("qweight", "qzeros", "scales", "g_idx")}[quant.method if quant else None]
        for kind in kinds + (("bias",) if bias else ()):
            dtype = torch.int32 if kind in ("qweight", "qzeros", "g_idx") else None
            # zeros where padding may stay unloaded (a quantized layer's), else left uninitialised
            make = torch.zeros if quant else torch.empty
            param = nn.Parameter(make(stored_shape(kind, in_features, out_features, quant), dtype=dtype),
                                 requires_grad=False)
            param.kind, param.weight_loader = kind, self.weight_loader
            setattr(self, kind, param)
        if not bias:
            self.bias = None

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight: the stored one, or dequantized (the plain-torch path)."""
        if self.quant is None:
            return self.weight
        if self.quant.method == "gptq":
            return gptq.dequantize(self.qweight, self.qzeros, self.scales, self.quant.zero_offset).t()
        return awq.dequantize(self.qweight, self.qzeros, self.scales).t()

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W (+ bias). A 4-bit layer on CUDA reads its packed weight in Triton kernels (whose tiles divide a group
        of a multiple of 16); the CPU computes through the dequantized dense weight."""
        if self.quant is not None and x.is_cuda and self.quant.group_size % 16 == 0:
            from vlserve.kernels.int4_matmul_triton import int4_linear
            return int4_linear(x, self.qweight, self.qzeros, self.scales, bias, self.quant.method,
                               self.quant.group_size, self.quant.zero_offset)
        return F.linear(x, self.dense_weight(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; no communication. `tp=(0, 1)` keeps a layer whole (vision data mode).
    `real_out`: the outputs the checkpoint holds, when the layer is padded wider."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: tuple[int, int] | None = None,
                 quant: QuantConfig | None = None, real_out: int | None = None):
        rank_size = tp if tp is not None else (tp_rank(), tp_size())
        if out_features % rank_size[1]:
            raise CheckpointError(f"{out_features} output features do not split over {rank_size[1]} ranks")
        super().__init__(in_features, out_features // rank_size[1], bias, tp, quant)
        self.full_out, self.real_out, self.in_features = out_features, real_out or out_features, in_features

    def weight_loader(self, param, loaded, name, shard_id=None):
        self.load_outputs(param, loaded, name, 0, self.full_out, self.real_out, 0)

    def load_outputs(self, param, loaded, name: str, first: int, size: int, real: int, dst: int) -> None:
        """This rank's share of the `size` outputs that start at output `first` of the layer (`real` of them in
        the checkpoint tensor `loaded`), written from this rank's output `dst` on."""
        expect_shape(name, loaded, stored_shape(param.kind, self.in_features, real, self.quant))
        if param.kind == "g_idx":  # the inputs' groups: whole on every rank, the same for every output
            check_groups(name, loaded, self.quant.group_size)
            return copy_into(param, loaded)
        axis, unit = out_axis(param.kind, self.quant)
        per = size // self.tp_size
        load_range(param, loaded, axis, unit, self.tp_rank * per, (self.tp_rank + 1) * per, real, dst)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored in one weight (gate and up projections)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, tp=None,
                 quant: QuantConfig | None = None, real_sizes: list[int] | None = None):
        super().__init__(in_features, sum(out_sizes), bias, tp, quant)
        self.out_sizes, self.real_sizes = out_sizes, real_sizes or out_sizes

    def weight_loader(self, param, loaded, name, shard_id=None):
        dst = sum(self.out_sizes[:shard_id]) // self.tp_size
        self.load_outputs(param, loaded, name, 0, self.out_sizes[shard_id], self.real_sizes[shard_id], dst)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value heads in one weight. With fewer KV heads than ranks, KV heads are replicated."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = True, tp=None,
                 quant: QuantConfig | None = None):
        rank, size = tp if tp is not None else (tp_rank(), tp_size())
        self.num_heads = num_heads // size
        self.num_kv_heads = max(1, num_kv_heads // size)
        self.head_dim, self.in_features = head_dim, hidden
        self.total = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        LinearBase.__init__(self, hidden, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias, (rank, size),
                            quant)

    def weight_loader(self, param, loaded, name, shard_id=None):
        if shard_id is None:  # one fused q|k|v tensor (the vision tower's `qkv`)
            rows = loaded_shape(loaded)[0] // 3
            for i, part in enumerate("qkv"):
                self.weight_loader(param, loaded[i * rows:(i + 1) * rows], name, part)
            return
        local = self.num_heads if shard_id == "q" else self.num_kv_heads
        d = self.head_dim
        expect_shape(name, loaded, stored_shape(param.kind, self.in_features, self.total[shard_id] * d, self.quant))
        if param.kind == "g_idx":
            check_groups(name, loaded, self.quant.group_size)
            return copy_into(param, loaded)
        if shard_id == "q":
            first_head, offset = self.tp_rank * local, 0
        else:  # rank r uses KV head r * kv // tp: each KV head serves the query heads of its group
            first_head = self.tp_rank * self.total["k"] // self.tp_size
            offset = self.num_heads + (self.num_kv_heads if shard_id == "v" else 0)
        axis, unit = out_axis(param.kind, self.quant)
        total = self.total[shard_id] * d
        load_range(param, loaded, axis, unit, first_head * d, (first_head + local) * d, total, offset * d)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs summed with one all-reduce, bias added once. `real_in`: the
    inputs the checkpoint holds, when the layer is padded wider."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp=None,
                 quant: QuantConfig | None = None, real_in: int | None = None):
        rank_size = tp if tp is not None else (tp_rank(), tp_size())
        if in_features % rank_size[1]:
            raise CheckpointError(f"{in_features} input features do not split over {rank_size[1]} ranks")
        super().__init__(in_features // rank_size[1], out_features, bias, tp, quant)
        self.full_in, self.real_in, self.out_features = in_features, real_in or in_features, out_features

    def weight_loader(self, param, loaded, name, shard_id=None):
        if param.kind == "bias":  # whole on every rank
            return default_weight_loader(param, loaded, name)
        expect_shape(name, loaded, stored_shape(param.kind, self.real_in, self.out_features, self.quant))
        if param.kind == "g_idx":
            check_groups(name, loaded, self.quant.group_size)
        axis, unit = in_axis(param.kind, self.quant)
        per = self.full_in // self.tp_size
        load_range(param, loaded, axis, unit, self.tp_rank * per, (self.tp_rank + 1) * per, self.real_in, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        y = tp_all_reduce(self._matmul(x, None))
        return y + self.bias if self.bias is not None else y
