"""The smallest real Triton kernel: `vlserve doctor` compiles and runs it on each card (imported only there)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask)


def add_on(index: int) -> None:
    """Adds two vectors on GPU `index` with the kernel; raises if it fails to compile, launch or add."""
    device = torch.device("cuda", index)
    x = torch.arange(1000, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    _add_kernel[(triton.cdiv(x.numel(), 256),)](x, x, out, x.numel(), BLOCK=256)
    torch.cuda.synchronize(device)
    if not torch.equal(out, 2 * x):
        raise RuntimeError("the kernel ran but computed wrong sums")
