"""RMSNorm module: drop-in for torch.nn.RMSNorm and Hugging Face LlamaRMSNorm."""
from __future__ import annotations

import operator

import torch
from torch import nn

from thrifty.ops.norm import rms_norm


def _hidden_size(value) -> int:
    """An int, or torch.nn.RMSNorm's normalized_shape as a 1-element list/tuple/torch.Size."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"thrifty.nn.RMSNorm: 'hidden_size' must be an int or a 1-element shape, got {value!r}")
    if not isinstance(value, int) and hasattr(value, "__index__"):  # numpy / 0-d integer tensor
        value = operator.index(value)
    if not isinstance(value, int):
        try:
            shape = tuple(value)
        except TypeError:
            raise TypeError(f"thrifty.nn.RMSNorm: 'hidden_size' must be an int or a 1-element shape, "
                            f"got {type(value).__name__} {value!r}") from None
        if len(shape) != 1:
            raise ValueError(f"thrifty.nn.RMSNorm normalizes over the last dim only: 'hidden_size' must be an int "
                             f"or a 1-element shape (got {shape})")
        return _hidden_size(shape[0])
    if value < 0:
        raise ValueError(f"thrifty.nn.RMSNorm: 'hidden_size' must be >= 0, got {value}")
    return value


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

    Its state_dict is ``{"weight": (hidden_size,)}``, the same as torch.nn.RMSNorm and
    Hugging Face's LlamaRMSNorm, so checkpoints load unchanged. ``forward(x, residual)``
    runs the fused add + norm and returns ``(y, x + residual)``.
    """

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None):
        # torch.nn.RMSNorm's positional order (normalized_shape, eps, elementwise_affine, device, dtype)
        super().__init__()
        hidden_size = _hidden_size(hidden_size)
        if not isinstance(elementwise_affine, bool):
            raise TypeError(f"thrifty.nn.RMSNorm: 'elementwise_affine' must be a bool, got {elementwise_affine!r} "
                            "(the arguments follow torch.nn.RMSNorm: (normalized_shape, eps, elementwise_affine, "
                            "device, dtype); pass device and dtype by keyword)")
        self.normalized_shape = (hidden_size,)  # torch.nn.RMSNorm's attributes
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        else:  # as torch.nn.RMSNorm(..., elementwise_affine=False): no weight, an empty state_dict
            self.register_parameter("weight", None)
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight = 1 (as torch.nn.RMSNorm.reset_parameters): after ``to_empty`` of a module built on the
        meta device, this gives it real initial values."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    @property
    def variance_epsilon(self) -> float | None:  # the Hugging Face attribute name
        return self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # eps=None is torch.nn.RMSNorm's default: the machine epsilon of the dtype it computes in (float32 for
        # float32 / bfloat16 / float16 inputs, as torch's kernels take it: bf16's own 2^-7 is ~6e4x larger)
        eps = (torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps if self.eps is None else self.eps)
        weight = self.weight
        if weight is None:  # the kernels take a weight: ones of x's dtype (exact: y * 1 = y)
            weight = torch.ones(self.normalized_shape, dtype=x.dtype, device=x.device)
        return rms_norm(x, weight, eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}" + ("" if self.elementwise_affine else ", elementwise_affine=False")
