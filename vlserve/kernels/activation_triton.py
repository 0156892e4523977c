"""Triton SwiGLU: SiLU(gate) * up in one pass over the gate/up projection's output, instead of a silu kernel, a
mul kernel and the intermediate between them. Rounds like `SiluAndMul` (activation.py): SiLU in fp32, cast to the
activations' dtype before the multiply.

Plain Triton ops only: runs from sm_75 to sm_90, in fp16, bf16 and fp32. GPU only: import this module only where
triton is installed."""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # output columns per program


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows * 2d can pass 2**31 in long prefills
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(up.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (..., 2d) = [gate | up], last dim contiguous. Returns SiLU(gate) * up, (..., d), in a new tensor."""
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out
    out_rows = out.view(-1, d)
    block = min(BLOCK, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
        rows, out_rows, rows.stride(0), out_rows.stride(0), D=d, BLOCK=block, num_warps=4)
    return out
