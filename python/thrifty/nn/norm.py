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

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, device=None, dtype=None):
        super().__init__()
        if not isinstance(hidden_size, int):  # torch.nn.RMSNorm's normalized_shape as a 1-element list/tuple
            shape = tuple(hidden_size)
            if len(shape) != 1:
                raise ValueError(f"thrifty.nn.RMSNorm normalizes over the last dim only: 'hidden_size' must be an int "
                                 f"or a 1-element shape (got {shape})")
            hidden_size = shape[0]
        hidden_size = int(hidden_size)
        self.normalized_shape = (hidden_size,)  # torch.nn.RMSNorm's attribute
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    @property
    def variance_epsilon(self) -> float | None:  # the Hugging Face attribute name
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # eps=None is torch.nn.RMSNorm's default: the machine epsilon of x's dtype
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return rms_norm(x, self.weight, eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
