"""Helpers shared by the op wrappers."""
from __future__ import annotations

import torch


def lead_shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1])
