"""SwiGLU MLP module: the gate/up/down MLP of Llama, loading Hugging Face LlamaMLP weights."""
from __future__ import annotations

import torch
from torch import nn

from thrifty.ops.activation import swiglu


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), with thrifty's fused silu-and-multiply.

    Parameter names (gate_proj, up_proj, down_proj, each an nn.Linear) are Hugging Face's
    LlamaMLP ones, so its state_dict loads unchanged.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"
