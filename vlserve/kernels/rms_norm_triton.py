"""Triton RMSNorm, alone or after the residual add: one program per row, the whole row in registers, so the
layer's five elementwise kernels (add, pow, mean, rsqrt, mul) become one. Rounds like `RMSNorm` (norm.py): the sum
in the activations' dtype, the statistics in fp32, the normed row cast back before the weight multiplies it.

Plain Triton ops only: runs from sm_75 to sm_90, in fp16, bf16 and fp32. GPU only: import this module only where
triton is installed."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows * hidden can pass 2**31 in long prefills
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual_ptrs = residual_ptr + row * stride_r + cols
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual.dtype)
        tl.store(residual_ptrs, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = h.to(x.dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    """Enough threads that a row of up to 8192 keeps its elements in registers (16 to 32 per thread)."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0] == 0:
        return out
    out_rows = out.view(-1, hidden)
    residual_rows = rows if residual is None else residual.view(-1, hidden)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, residual_rows, weight, out_rows, rows.stride(0), residual_rows.stride(0), out_rows.stride(0), eps,
        HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None, num_warps=_num_warps(block))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., hidden), last dim contiguous; weight: (hidden,). Returns weight * norm(x) in a new tensor."""
    return _launch(x, None, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, residual: (..., hidden) of one dtype, last dim contiguous; residual a view of its rows. Writes
    x + residual into `residual` itself and returns weight * norm(x + residual) in a new tensor; x is unchanged."""
    return _launch(x, residual, weight, eps)
