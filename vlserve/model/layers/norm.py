"""RMSNorm, computed in fp32 as the checkpoints were trained, optionally adding the residual first; and LayerNorm
(Qwen2-VL's vision tower)."""

import torch
import torch.nn.functional as F
from torch import nn

from vlserve.model.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns norm(x) or, with a residual, (norm(x + residual), x + residual). On CUDA one Triton kernel does
        it all and writes x + residual into `residual` itself: callers hand their residual over."""
        if x.is_cuda:
            from vlserve.kernels.rms_norm_triton import fused_add_rms_norm, rms_norm
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps), residual
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (Qwen2-VL's vision tower), loaded like every other parameter."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.weight.weight_loader = self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
