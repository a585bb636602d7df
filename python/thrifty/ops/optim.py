"""Fused multi-tensor optimizer steps (the kernels under :mod:`thrifty.optim`).

Every op updates a whole list of tensors in one parallel pass (CPU) or one launch (CUDA),
reading each element once (p or its float32 master, g, m, v) and writing it once. Hyper-
parameters that change per step (lr) and the grad scale / inf flag are one-value float32
tensors, so CUDA never syncs with the host and torch.compile never recompiles for them.

AdamW (decoupled weight decay, torch.optim.AdamW's math), with t = step + 1::

    g = g * grad_coef                           # 1 / loss scale, times the clipping coefficient
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = b2 * v + (1 - b2) * g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Lion: ``c = m + (1 - b1)(g - m); p = p (1 - lr wd) - lr sign(c); m = m + (1 - b2)(g - m)``.

8-bit AdamW keeps m and v as uint8 codes into the bitsandbytes dynamic maps (signed for m,
unsigned for v) with one float32 absmax per 256-element block: dequantize, update (the
parameter update uses the float m, v), take the block's new absmax, requantize each value
to the nearest code.

When ``found_inf`` is nonzero, nothing is written (steps included): the GradScaler protocol.
These are optimizer updates: not differentiable.
"""
from __future__ import annotations

import torch

from thrifty.ops._common import refuse_tangents, register_fake

_ops = torch.ops.thrifty

QUANT_BLOCK = 256


def multi_tensor_l2norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum of x^2 over every element of every tensor), float32 0-d, on the tensors' device.

    Float32 partial sums per fixed chunk, then a fixed-order float64 sum (CPU): deterministic
    whatever the thread count. NaN/inf in any element makes it NaN/inf.

    An empty list gives a float32 zero on the CPU (as torch.nn.utils.clip_grad_norm_ with no grads):
    with no tensors there is no device to dispatch to.
    """
    # a single tensor counts as a list of one, as torch.nn.utils.clip_grad_norm_ takes it
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"thrifty.multi_tensor_l2norm: argument 'tensors' must hold tensors only, element {i} "
                            f"is {type(t).__name__}")
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    refuse_tangents("thrifty.multi_tensor_l2norm", ((f"tensors[{i}]", t) for i, t in enumerate(tensors)))
    return _ops.multi_tensor_l2norm(tensors)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The bitsandbytes dynamic quantization map: 256 sorted float32 values in [-1, 1] (signed)
    or [0, 1] (unsigned), a decimal exponent plus a linear fraction that gets more bits as the
    exponent grows (Dettmers, 8-Bit Approximations for Parallelism in Deep Learning)."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2 ** total_bits
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer (the kernels' rule): per 256-element block absmax = max|x|, codes =
    the number of code midpoints (q[k] + q[k+1]) / 2 below x / absmax: the nearest code, ties to the lower;
    a map starting at 0 (unsigned, the second moment's) has its first midpoint at 0, so a positive value never
    rounds to 0 (a v of 0 under a nonzero m made AdamW's next update m / eps). Returns (codes uint8, absmax)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    nb = (n + QUANT_BLOCK - 1) // QUANT_BLOCK
    pad = torch.zeros(nb * QUANT_BLOCK, dtype=torch.float32, device=flat.device)
    pad[:n] = flat
    blocks = pad.view(nb, QUANT_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    xn = torch.where(absmax[:, None] > 0, blocks / safe[:, None], torch.zeros_like(blocks)).reshape(-1)[:n]
    q = qmap.to(device=xn.device, dtype=torch.float32)
    mids = (q[:-1] + q[1:]) * 0.5
    if q[0] == 0:
        mids[0] = 0.0
    codes = torch.searchsorted(mids, xn.contiguous(), side="left").to(torch.uint8)  # #mids below x
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """float32 values of ``codes`` (uint8, any shape) with per-256-block scales ``absmax``."""
    flat = codes.reshape(-1).long()
    n = flat.numel()
    scale = absmax.repeat_interleave(QUANT_BLOCK)[:n]
    return (qmap.to(codes.device)[flat] * scale).view(codes.shape)


# ---- fake implementations: the steps mutate in place and return nothing ----
@register_fake("thrifty::multi_tensor_l2norm")
def _l2norm_fake(tensors):
    if len(tensors) == 0:
        return torch.empty((), dtype=torch.float32)
    return tensors[0].new_empty((), dtype=torch.float32)


def _setup_l2norm(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0], output)


def _backward_l2norm(ctx, grad):
    # d sqrt(sum x^2) / dx = x / norm (0 where the norm is 0, as torch.linalg.vector_norm).
    *tensors, norm = ctx.saved_tensors
    scale = torch.where(norm == 0, torch.zeros_like(norm), grad / norm)
    # needs_input_grad[0] is one flag per tensor of the list
    return [(t.float() * scale).to(t.dtype) if need else None for t, need in zip(tensors, ctx.needs_input_grad[0])]


torch.library.register_autograd("thrifty::multi_tensor_l2norm", _backward_l2norm, setup_context=_setup_l2norm)


@register_fake("thrifty::adamw_step")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, beta1, beta2, eps, weight_decay,
                     grad_coef, found_inf):
    return None


@register_fake("thrifty::adamw8bit_step")
def _adamw8bit_step_fake(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, qmap_m, qmap_v, masters, steps,
                         lr, beta1, beta2, eps, weight_decay, grad_coef, found_inf):
    return None


@register_fake("thrifty::lion_step")
def _lion_step_fake(params, grads, exp_avgs, masters, lr, beta1, beta2, weight_decay, grad_coef, found_inf):
    return None
