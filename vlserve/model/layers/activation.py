"""SwiGLU: SiLU(gate) * up, with gate and up stored side by side in one projection (one Triton kernel on CUDA)."""

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from vlserve.kernels.activation_triton import silu_and_mul
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
