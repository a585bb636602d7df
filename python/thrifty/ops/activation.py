"""SwiGLU: the gated activation of the Llama MLP.

Forward, elementwise, float32 inside and one rounding to the input dtype::

    out = silu(gate) * up = gate * sigmoid(gate) * up

Backward, with s = sigmoid(gate) recomputed (silu(gate) is never stored)::

    grad_up   = grad * gate * s
    grad_gate = grad * up * s * (1 + gate * (1 - s))
"""
from __future__ import annotations

import torch

from thrifty.ops._common import call_op, register_autocast, register_fake, register_no_double_backward, require_tensors

_ops = torch.ops.thrifty


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up.

    Args:
        gate, up: same shape (..., n), same dtype (float32/bfloat16/float16), any leading
            dims (or both 0-d). The last dim must be contiguous for a copy-free call; other strides are
            free, so the two halves of one fused (..., 2n) gate_up projection
            (``gate_up.chunk(2, -1)``) are read in place.
    Returns:
        (..., n) contiguous, the dtype of gate.
    """
    require_tensors("thrifty.swiglu", gate=gate, up=up)
    if gate.dim() == 0 and up.dim() == 0:  # scalars, as torch's silu(g) * u takes them (the kernels want a last dim)
        return call_op(_ops.swiglu, gate.reshape(1), up.reshape(1)).reshape(())
    return call_op(_ops.swiglu, gate, up)


@register_fake("thrifty::swiglu")
def _swiglu_fake(gate, up):
    if gate.dim() == 0:  # as the kernels' check (the public swiglu reshapes scalars first)
        raise ValueError(f"thrifty.swiglu: argument 'gate' must have at least 1 dimension(s) (got shape "
                         f"{list(gate.shape)})")
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@register_fake("thrifty::swiglu_backward")
def _swiglu_backward_fake(grad, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_swiglu(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward_swiglu(ctx, grad):
    gate, up = ctx.saved_tensors
    return _ops.swiglu_backward(grad, gate, up)


torch.library.register_autograd("thrifty::swiglu", _backward_swiglu, setup_context=_setup_swiglu)
register_autocast("thrifty::swiglu", "promote")  # elementwise, as torch's mul and silu
register_no_double_backward("thrifty::swiglu_backward")
