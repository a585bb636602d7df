"""Low-precision linear: ``y = x @ weight.T + bias`` with float32 accumulation.

x (..., K), weight (N, K), bias (N,) share one dtype (float32, bfloat16 or float16); y (..., N) is in
that dtype, rounded once. On the CPU, few rows (decode: at most 8) go to thrifty's GEMV, which streams
the weight once and widens bf16/f16 to float32 in registers (memory-bandwidth bound; torch's own bf16
GEMV is far slower on CPUs without avx512_bf16); more rows multiply float32 copies with ATen's GEMM
(bf16 directly at the avx512_bf16 ISA level). On CUDA it is ``torch.nn.functional.linear`` (cuBLAS).

Backward (torch ops; float32 on the CPU for bf16/f16, for the same reason)::

    grad_x = grad_y @ weight            grad_weight = grad_y.T @ x   (leading dims flattened)
    grad_bias = grad_y summed over rows
"""
from __future__ import annotations

import math

import torch

from thrifty.ops._common import call_op, register_autocast, register_fake, require_tensors

_ops = torch.ops.thrifty


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias), like ``torch.nn.functional.linear``.

    Args:
        x: (..., K) float32, bfloat16 or float16; any strides.
        weight: (N, K), x's dtype, contiguous in its last dimension (a transposed weight is an error,
            not a hidden copy per call).
        bias: optional (N,), x's dtype.
    Returns:
        (..., N) in x's dtype, contiguous.
    """
    require_tensors("thrifty.linear", x=x, weight=weight)
    if bias is not None:
        require_tensors("thrifty.linear", bias=bias)
    return call_op(_ops.linear, x, weight, bias)


@register_fake("thrifty::linear")
def _linear_fake(x, weight, bias):
    torch._check(weight.dim() == 2, lambda: f"thrifty.linear: argument 'weight' must be 2-D (got {tuple(weight.shape)})")
    torch._check(weight.shape[1] == x.shape[-1],
                 lambda: f"thrifty.linear: argument 'weight' must have size {x.shape[-1]} in dimension 1")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_linear(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward_linear(ctx, grad_y):
    x, weight = ctx.saved_tensors
    n, k = weight.shape
    m = math.prod(x.shape[:-1])  # rows; reshape(-1, n) is ambiguous when n or k is 0
    g = grad_y.reshape(m, n)
    # torch's bf16/f16 CPU matmuls are slow below avx512_bf16: multiply float32 copies there
    cdt = torch.float32 if g.device.type == "cpu" else g.dtype
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = (g.to(cdt) @ weight.to(cdt)).to(x.dtype).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = (g.to(cdt).t() @ x.reshape(m, k).to(cdt)).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g.to(torch.float32).sum(0).to(grad_y.dtype)
    return grad_x, grad_w, grad_b


torch.library.register_autograd("thrifty::linear", _backward_linear, setup_context=_setup_linear)
register_autocast("thrifty::linear", "lower")  # as torch's linear
