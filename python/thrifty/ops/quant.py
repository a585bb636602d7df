"""Quantized linear layers: W8A16 / W4A16 (``quant_linear``) and W8A8 (``quantize_per_token`` +
``int8_linear``). Formats (version 1) are documented in docs/QUANT_FORMATS.md.

Math, with N = out_features, K = in_features, G = group_size::

    bits=8: w[n, k] = qweight[n, k] * scales[n]                          qweight int8 (N, K)
    bits=4: w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]   qweight uint8 (N, K/2),
            q[n, 2i] = qweight[n, i] & 15, q[n, 2i+1] = qweight[n, i] >> 4
    quant_linear(x) = x @ w.T (+ bias), float32 accumulation, output in x's dtype
    W8A8: xq, xs = quantize_per_token(x)  (xs = amax|x| / 127 per row, xq = round(x / xs))
          int8_linear = (xq @ wq.T, exact in int32) * xs * w_scales (+ bias)

Backward of quant_linear (weights are frozen): grad_x = grad_y @ w, grad_bias = sum of grad_y over rows.
quantize_per_token / int8_linear have none (int8 tensors carry no gradient); thrifty.nn.QuantLinear's
W8A8 forward passes the same gradient straight through the activation rounding.
"""
from __future__ import annotations

import torch

from thrifty.ops._common import (call_op, register_autocast, register_fake, register_not_differentiable,
                                 require_tensors)

_ops = torch.ops.thrifty


def _int_arg(op: str, name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(v).__name__} ({v!r})")


def _packed_k(qweight: torch.Tensor, bits: int) -> int:
    """in_features K of a packed (N, K) int8 or (N, K/2) uint8 weight."""
    return qweight.shape[1] * (2 if bits == 4 else 1)


def _weight_k(qweight, scales, bits: int, group_size: int) -> int | None:
    """in_features K of the packed weight when qweight and scales agree with each other (then a K that
    differs from x's is x's fault), else None (the op's own checks name the inconsistent tensor)."""
    if not (isinstance(qweight, torch.Tensor) and isinstance(scales, torch.Tensor) and qweight.dim() == 2):
        return None
    n, k = qweight.shape[0], _packed_k(qweight, bits)
    if bits == 8:
        ok = tuple(scales.shape) == (n,)
    else:
        ok = group_size > 0 and scales.dim() == 2 and scales.shape[0] == n and scales.shape[1] * group_size == k
    return k if ok else None


def _check_x(op: str, name: str, x, k: int | None, what) -> None:
    """what(): the weight's layout for the message, built only on the error path (an f-string over a
    symbolic shape concatenated on every call broke torch.compile(fullgraph=True, dynamic=True))."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a tensor, got {type(x).__name__}")
    if k is not None and x.dim() >= 1 and x.shape[-1] != k:
        raise ValueError(f"{op}: argument '{name}' must have the weight's in_features K={k} in its last dimension "
                         f"({what()}), got shape {tuple(x.shape)}")


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None, *,
                 bits: int, group_size: int | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(qweight).T (+ bias) for W8A16 (bits=8) and W4A16 (bits=4).

    Args:
        x: (..., K) float32, bfloat16 or float16.
        qweight: bits=8: int8 (N, K); bits=4: uint8 (N, K/2), k even in the low nibble.
        scales: float32, (N,) for bits=8 or (N, K/group_size) for bits=4.
        zeros: bits=4 only, float32 (N, K/group_size) zero points (w = (q - zeros) * scales).
        bits: 4 or 8.
        group_size: bits=4: a multiple of 32 dividing K; bits=8: -1 or None (per output channel).
        bias: optional (N,), x's dtype or float32.
    Returns:
        (..., N) in x's dtype.
    Raises TypeError / ValueError naming the argument, x's among them when its last dimension is not
    the K of a packed weight that agrees with its scales.
    """
    op = "thrifty.quant_linear"
    require_tensors(op, x=x, qweight=qweight, scales=scales)
    for name, t in (("zeros", zeros), ("bias", bias)):
        if t is not None:
            require_tensors(op, **{name: t})
    _int_arg(op, "bits", bits)
    if group_size is None and bits == 8:  # per output channel: no groups
        group_size = -1
    if group_size is None:
        raise TypeError(f"{op}: argument 'group_size' must be an int for bits={bits} (bits=4: a multiple of 32 "
                        "dividing K, 32, 64, 128), got None")
    _int_arg(op, "group_size", group_size)
    k = _weight_k(qweight, scales, bits, group_size) if bits in (4, 8) else None
    _check_x(op, "x", x, k, lambda: f"qweight {tuple(qweight.shape)}: " + (
        "two 4-bit weights per byte, K = 2 * qweight.shape[1]" if bits == 4 else "(N, K)"))
    return call_op(_ops.quant_linear, x, qweight, scales, zeros, bits, group_size, bias)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None, *, bits: int,
               group_size: int) -> torch.Tensor:
    """The float32 (N, K) weight quant_linear multiplies by (each element rounded once to float32)."""
    require_tensors("thrifty.dequantize", qweight=qweight, scales=scales)
    if zeros is not None:
        require_tensors("thrifty.dequantize", zeros=zeros)
    return _ops.quant_dequantize(qweight, scales, zeros, bits, group_size)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization per row of x (..., K).

    Returns (xq int8 (..., K), scales float32 (..., 1)) with scales = max|x| / 127 over the row
    and xq = round_half_even(x * 127 / max|x|), so xq * scales ~ x. An all-zero row gets scale 0.
    """
    require_tensors("thrifty.quantize_per_token", x=x)
    return _ops.quantize_per_token(x)


def int8_linear(xq: torch.Tensor, x_scales: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W8A8: y = (xq @ wq.T accumulated exactly in int32) * x_scales * w_scales (+ bias).

    Args:
        xq: int8 (..., K); x_scales: float32, one per row ((...) or (..., 1)).
        wq: int8 (N, K); w_scales: float32 (N,).
        bias: optional (N,) float.
        out_dtype: float32 (default), bfloat16 or float16.
    """
    require_tensors("thrifty.int8_linear", xq=xq, x_scales=x_scales, wq=wq, w_scales=w_scales)
    if bias is not None:
        require_tensors("thrifty.int8_linear", bias=bias)
    k = _weight_k(wq, w_scales, 8, -1)
    _check_x("thrifty.int8_linear", "xq", xq, k, lambda: f"wq {tuple(wq.shape)}: (N, K)")
    return _ops.int8_linear(xq, x_scales, wq, w_scales, bias, out_dtype)


# ---- fake (shape-only) implementations ----
@register_fake("thrifty::quant_linear")
def _quant_linear_fake(x, qweight, scales, zeros, bits, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@register_fake("thrifty::quant_dequantize")
def _dequantize_fake(qweight, scales, zeros, bits, group_size):
    return qweight.new_empty((qweight.shape[0], _packed_k(qweight, bits)), dtype=torch.float32)


@register_fake("thrifty::quantize_per_token")
def _quantize_per_token_fake(x):
    return (torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@register_fake("thrifty::int8_linear")
def _int8_linear_fake(xq, x_scales, wq, w_scales, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype or torch.float32)


# ---- autograd: gradients w.r.t. x and bias (the quantized weight is frozen) ----
def _setup_quant_linear(ctx, inputs, output):
    x, qweight, scales, zeros, bits, group_size, bias = inputs
    ctx.bits, ctx.group_size = bits, group_size
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(qweight, scales, zeros)


def _sum_rows(grad_y: torch.Tensor) -> torch.Tensor:
    """grad_y (..., N) summed over its leading dims in float32 (reshape(-1, N) is ambiguous for N = 0)."""
    g = grad_y.float()
    return g.sum(dim=tuple(range(g.dim() - 1))) if g.dim() > 1 else g  # sum(dim=()) would sum everything


_DEQUANT_BLOCK_BYTES = 16 << 20  # float32 weight rows dequantized at a time in the frozen layers' backward


def frozen_weight_grads(grad_y, qweight, scales, zeros, bits: int, group_size: int, x_dtype, bias_dtype,
                        need_x: bool, need_bias: bool):
    """(grad_x, grad_bias) of y = x @ dequant(W).T + bias with W frozen: grad_x = grad_y @ w in float32
    (then x's dtype), grad_bias = grad_y summed over rows. Shared by quant_linear's backward and
    QuantLinear's W8A8 straight-through backward."""
    grad_x = grad_bias = None
    if need_x:
        # float32 sums over blocks of output rows, each dequantized on its own: a float32 copy of the whole
        # weight (N K 4 bytes, 224 MiB for a 4096 x 14336 layer) per layer per backward was a QLoRA step's peak
        n, k = qweight.shape[0], _packed_k(qweight, bits)
        g = grad_y.float()
        gx = g.new_zeros(g.shape[:-1] + (k,))
        if n > 0 and gx.numel() > 0:
            g2, gx2 = g.reshape(-1, n), gx.view(-1, k)
            rows = max(1, _DEQUANT_BLOCK_BYTES // (4 * max(k, 1)))
            for n0 in range(0, n, rows):
                w = _ops.quant_dequantize(qweight[n0:n0 + rows], scales[n0:n0 + rows],
                                          zeros[n0:n0 + rows] if zeros is not None else None, bits, group_size)
                gx2.addmm_(g2[:, n0:n0 + rows], w)
        grad_x = gx.to(x_dtype)
    if bias_dtype is not None and need_bias:
        grad_bias = _sum_rows(grad_y).to(bias_dtype)
    return grad_x, grad_bias


def _backward_quant_linear(ctx, grad_y):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # an error, not a silent None grad (as dequantize's)
        raise RuntimeError("thrifty.quant_linear: 'scales' and 'zeros' get no gradient (the quantized weight is "
                           "frozen; x and bias have gradients): detach them, or train the float layer (or LoRA "
                           "adapters beside this one)")
    qweight, scales, zeros = ctx.saved_tensors
    grad_x, grad_bias = frozen_weight_grads(grad_y, qweight, scales, zeros, ctx.bits, ctx.group_size, ctx.x_dtype,
                                            ctx.bias_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[6])
    return grad_x, None, None, None, None, None, grad_bias


torch.library.register_autograd("thrifty::quant_linear", _backward_quant_linear, setup_context=_setup_quant_linear)
# x to the autocast dtype, as torch's linear; the float32 scales / zeros and the bias are taken as they are
# (quant_linear(x, qweight, scales, zeros, bits, group_size, bias))
register_autocast("thrifty::quant_linear", "lower", keep=(2, 3, 6))


# ---- the inference-only ops: backpropagating through them is an error, not a silent None grad ----
register_not_differentiable("thrifty::quant_dequantize", "it unpacks a frozen quantized weight (scales and zeros "
                            "get no gradient)")
register_not_differentiable("thrifty::quantize_per_token", "rounding to int8 has no useful derivative; for "
                            "training through a W8A8 layer use thrifty.quant.QuantLinear, whose backward is "
                            "straight-through")


def _int8_linear_bias_grad(ctx, grad_y):
    # y = acc * x_scales * w_scales + bias: only the bias has a gradient worth giving.
    bias_meta = ctx.inputs_meta[4]
    grad_bias = None
    if bias_meta is not None and ctx.needs_input_grad[4]:
        grad_bias = _sum_rows(grad_y).to(bias_meta[0])
    return None, None, None, None, grad_bias, None


register_not_differentiable("thrifty::int8_linear", "only its bias has a gradient (xq and wq are int8; the "
                            "scales are frozen); for training through a W8A8 layer use "
                            "thrifty.quant.QuantLinear, whose backward is straight-through",
                            allowed=_int8_linear_bias_grad)
