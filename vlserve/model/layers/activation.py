"""Activations: SwiGLU (SiLU(gate) * up, gate and up stored side by side in one projection; one Triton kernel on
CUDA) and the plain ones a checkpoint's `hidden_act` names."""

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


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
