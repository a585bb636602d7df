"""Helpers shared by the op wrappers."""
from __future__ import annotations

import torch


def register_no_double_backward(opname: str) -> None:
    """Registers autograd for a backward op (e.g. "thrifty::rms_norm_backward") that raises
    when differentiated again, instead of PyTorch's silent not-implemented fallback."""

    def _backward(ctx, *grads):
        raise NotImplementedError(f"{opname} is not differentiable (double backward of a thrifty op is not supported)")

    torch.library.register_autograd(opname, _backward)
