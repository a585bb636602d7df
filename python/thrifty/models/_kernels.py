"""The model's kernel choices in one place: thrifty's rotary embedding and SwiGLU MLP."""
from __future__ import annotations

from thrifty.nn import SwiGLU as MLP  # noqa: F401  (gate_proj / up_proj / down_proj, fused silu * up)
from thrifty.ops import rotary_embedding


def rotary(q, k, positions, cos_sin):
    """neox-style rotary of q (..., heads, d) and k (..., kv_heads, d) at positions (...)."""
    return rotary_embedding(q, k, positions, cos_sin)
