"""RMSNorm module: drop-in for torch.nn.RMSNorm and Hugging Face LlamaRMSNorm."""
from __future__ import annotations

import torch
from torch import nn

from thrifty.ops.norm import rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

    Its state_dict is ``{"weight": (hidden_size,)}``, the same as torch.nn.RMSNorm and
    Hugging Face's LlamaRMSNorm, so checkpoints load unchanged. ``forward(x, residual)``
    runs the fused add + norm and returns ``(y, x + residual)``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    @property
    def variance_epsilon(self) -> float:  # the Hugging Face attribute name
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
