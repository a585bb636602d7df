"""RMSNorm, plain and fused with the residual add of a pre-norm transformer block.

Forward (over the last dim, float32 accumulation, output in x's dtype)::

    rstd = 1 / sqrt(mean(x^2) + eps)
    y    = x * rstd * weight

Backward, with xhat = x * rstd and gw = grad_y * weight::

    grad_x      = rstd * (gw - xhat * mean(gw * xhat))
    grad_weight = sum over rows of grad_y * xhat

Fused add: h = x + residual (rounded to x's dtype, as the unfused add would), y = rms_norm(h);
gradients w.r.t. x and residual are both grad_h + d y/d h.
"""
from __future__ import annotations

import torch

from thrifty.ops._common import call_op, register_autocast, register_fake, register_no_double_backward, require_tensors

_ops = torch.ops.thrifty


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x`` (any leading dims, float32/bfloat16/float16).

    Args:
        x: (..., hidden).
        weight: (hidden,), x's dtype or float32.
        eps: added to mean(x^2) before the square root.
        residual: optional, like x. If given, computes h = x + residual first and
            returns ``(y, h)``: the fused add + norm of a pre-norm block.
    Returns:
        y (..., hidden) in x's dtype, or (y, h) with ``residual``.
    """
    # the kernels read weight as one dense vector: a strided one (w[::2], an expanded view) is copied
    # here, a hidden-size copy; autograd carries grad_weight back through the copy to the strided view
    require_tensors("thrifty.rms_norm", x=x, weight=weight)
    if residual is not None:
        require_tensors("thrifty.rms_norm", residual=residual)
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if residual is None:
        y, _ = call_op(_ops.rms_norm, x, weight, eps)
        return y
    y, h, _ = call_op(_ops.fused_add_rms_norm, x, residual, weight, eps)
    return y, h


# ---- fake (shape-only) implementations: torch.compile and meta tensors ----
@register_fake("thrifty::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@register_fake("thrifty::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), x.new_empty(x.shape[:-1], dtype=torch.float32)


@register_fake("thrifty::rms_norm_backward")
def _rms_norm_backward_fake(grad_y, x, weight, rstd, grad_h):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight, memory_format=torch.contiguous_format)


# ---- autograd ----
def _setup_rms_norm(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _backward_rms_norm(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = _ops.rms_norm_backward(grad_y, x, weight, rstd, None)
    return grad_x, grad_w, None


torch.library.register_autograd("thrifty::rms_norm", _backward_rms_norm, setup_context=_setup_rms_norm)


def _setup_fused(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)


def _backward_fused(ctx, grad_y, grad_h, _grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    grad_x, grad_w = _ops.rms_norm_backward(grad_y, h, weight, rstd, grad_h)
    return grad_x, grad_x, grad_w, None


torch.library.register_autograd("thrifty::fused_add_rms_norm", _backward_fused, setup_context=_setup_fused)
# Autocast as torch's norms: on CUDA float32 (layer_norm's rule: the residual stream stays float32, as in Hugging
# Face's models); on the CPU, where torch's autocast leaves layer_norm / rms_norm alone, the input's dtype (bf16
# stays bf16, as torch.nn.RMSNorm) with the fused add's two inputs promoted as their unfused x + residual would be.
# The weight follows the activations' dtype unless float32 (the kernels take either), as torch's norm takes a
# bf16 weight with float32 input.
register_autocast("thrifty::rms_norm", "fp32", devices=("cuda",))
register_autocast("thrifty::fused_add_rms_norm", "fp32", devices=("cuda",))
register_autocast("thrifty::rms_norm", "promote", devices=("cpu",), follow=(1,))  # (x, weight, eps)
register_autocast("thrifty::fused_add_rms_norm", "promote", devices=("cpu",), follow=(2,))  # (x, residual, weight, eps)
register_no_double_backward("thrifty::rms_norm_backward")
