"""The model's kernel choices in one place: rotary embedding and the SwiGLU MLP.

Plain torch until thrifty's rotary / swiglu ops are merged; then thrifty's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotary(q, k, positions, cos_sin):
    """neox-style rotary of q (..., heads, d) and k (..., kv_heads, d) at positions (...)."""
    cs = cos_sin[positions].unsqueeze(-2)  # (..., 1, d) [cos | sin]
    cos, sin = cs.chunk(2, dim=-1)

    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with Hugging Face's parameter names."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
