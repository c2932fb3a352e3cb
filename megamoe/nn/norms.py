"""RMSNorm, computed in fp32 whatever the activation dtype (Yuan uses eps 1e-6 everywhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # NVIDIA apex ships a fused CUDA kernel; it is optional and never on PyPI.
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
except ImportError:
    fused_rms_norm_affine = None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight over the last dim.

    The statistics are taken in (at least) fp32 and the result is cast back to the input dtype, so bf16
    activations lose no precision in the reduction. apex's fused kernel (also fp32 inside) is
    used on CUDA when it is installed; elsewhere torch's ``F.rms_norm``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_rms_norm_affine is not None and x.is_cuda:
            return fused_rms_norm_affine(x, self.weight.to(x.dtype), self.weight.shape, self.eps)
        compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradchecks
        return F.rms_norm(x.to(compute), self.weight.shape, self.weight.to(compute), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
