"""AutoAWQ's GEMM format (4-bit weights, zero points, one scale per group of input features), as the public Qwen
AWQ checkpoints store it, and the plain-torch path that dequantizes it.

A linear layer of `in` inputs and `out` outputs is stored as (`g` = group size):
- qweight: int32 (in, out / 8): eight 4-bit weights per int32 along the outputs, in AWQ's interleaved order;
- qzeros: int32 (in / g, out / 8): the groups' zero points, packed the same way;
- scales: float16 (in / g, out): the groups' scales.
The weight is W[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o], and the layer computes x @ W (+ bias).
"""

import torch

from vlserve.model.quantization import PACK

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # which of 8 consecutive outputs sits in nibble j of their int32
AWQ_REVERSE = tuple(AWQ_ORDER.index(i) for i in range(PACK))  # the nibble that holds output i


def pack(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integers in [0, 16) -> (rows, cols / 8) int32, AWQ's nibble order."""
    rows, cols = values.shape
    v = values.to(torch.int32).view(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)
    return (v << shifts).sum(dim=-1, dtype=torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: (rows, n) int32 -> (rows, 8n) int32 in [0, 16)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[:, :, None] >> shifts).bitwise_and_(0xF)
    return nibbles[:, :, list(AWQ_REVERSE)].reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The (in, out) weight in the scales' dtype, as AutoAWQ computes it: (q - z) * s. In place where it can:
    at most two int32 copies of the weight alive at once (plan/memory.py dequantize_peak)."""
    group = qweight.shape[0] // scales.shape[0]
    q = unpack(qweight).sub_(unpack(qzeros).repeat_interleave(group, dim=0))
    return q.to(scales.dtype).mul_(scales.repeat_interleave(group, dim=0))


def quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest AWQ quantization of a torch (out, in) weight (make-tiny's): per group of `group` inputs
    and each output, the scale and zero point that span its min..max; returns (qweight, qzeros, scales fp16)."""
    w = weight.t().float()  # (in, out)
    groups = w.view(w.shape[0] // group, group, w.shape[1])
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = (-lo / s).round().clamp(0, 15)
    q = (groups / s[:, None] + zeros[:, None]).round().clamp(0, 15).view_as(w)
    return pack(q), pack(zeros), scales
