"""Helpers for testing kernels against float64 references.

The accuracy rule (the FlashAttention habit): a kernel's error against the float64
reference may be at most `factor` times the error PyTorch's own computation makes in the
same low precision, plus a small absolute floor for values near zero.
"""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, *, factor: float = 2.0,
                        atol: float = 1e-5, name: str = "output") -> None:
    """out: the kernel's result; ref64: float64 reference; torch_lowp: PyTorch's own
    result in the same dtype as out (its error sets the bar)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{name}: NaN in output"
    err = max_err(out, ref64)
    bar = factor * max_err(torch_lowp, ref64) + atol
    assert err <= bar, f"{name}: max error {err:.3g} > {factor} x torch's {max_err(torch_lowp, ref64):.3g} + {atol}"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
