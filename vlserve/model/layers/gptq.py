"""GPTQ's 4-bit format (AutoGPTQ / GPTQModel, without act-order), as the public Qwen GPTQ-Int4 checkpoints store
it, and the plain-torch path that dequantizes it.

A linear layer of `in` inputs and `out` outputs is stored as (`g` = group size):
- qweight: int32 (in / 8, out): eight 4-bit weights per int32 along the inputs, input 8r + j in bits 4j..4j+3;
- qzeros: int32 (in / g, out / 8): the groups' zero points along the outputs, output 8c + j in bits 4j..;
  the original format ("gptq") stores each zero point minus one, "gptq_v2" as it is (QuantConfig.zero_offset);
- scales: float16 (in / g, out);
- g_idx: int32 (in,): each input's group, i // g without act-order (checked at load).
The weight is W[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o], and the layer computes x @ W (+ bias).
"""

import torch

from vlserve.model.quantization import PACK


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integers in [0, 16) -> (rows / 8, cols) int32, row 8r + j in nibble j."""
    v = values.to(torch.int32).view(values.shape[0] // PACK, PACK, values.shape[1])
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)[:, None]
    return (v << shifts).sum(dim=1, dtype=torch.int32)


def pack_cols(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integers in [0, 16) -> (rows, cols / 8) int32, column 8c + j in nibble j."""
    return pack_rows(values.t().contiguous()).t().contiguous()


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)[:, None]
    return (packed[:, None, :] >> shifts).bitwise_and_(0xF).reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    return unpack_rows(packed.t()).t()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """The (in, out) weight in the scales' dtype. In place where it can: at most two int32 copies of the weight
    alive at once (plan/memory.py dequantize_peak)."""
    group = qweight.shape[0] * PACK // scales.shape[0]
    q = unpack_rows(qweight).sub_((unpack_cols(qzeros) + zero_offset).repeat_interleave(group, dim=0))
    return q.to(scales.dtype).mul_(scales.repeat_interleave(group, dim=0))


def quantize(weight: torch.Tensor, group: int, sym: bool = False, zero_offset: int = 1) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest GPTQ quantization of a torch (out, in) weight (make-tiny's): (qweight, qzeros, scales
    fp16, g_idx). Symmetric: every zero point 8 and the scale from the largest magnitude."""
    w = weight.t().float()  # (in, out)
    groups = w.view(w.shape[0] // group, group, w.shape[1])
    if sym:
        scales = (groups.abs().amax(dim=1).clamp(min=1e-5) / 7.5).half()
        zeros = torch.full_like(scales, 8, dtype=torch.float32)
    else:
        lo, hi = groups.amin(dim=1), groups.amax(dim=1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half()
        zeros = (-lo / scales.float()).round().clamp(zero_offset, 15)
    q = (groups / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15).view_as(w)
    g_idx = torch.arange(w.shape[0], dtype=torch.int32) // group
    return pack_rows(q), pack_cols(zeros - zero_offset), scales, g_idx
