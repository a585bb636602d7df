"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without the (tokens, vocab) logits.

With z = hidden @ weight.T (capped: z = c * tanh(z / c) when ``softcap`` c > 0), y the labels,
eps the label smoothing and V the vocab, per token::

    lse_i  = log sum_j exp(z_ij)
    loss_i = (1 - eps) * (lse_i - z_iy) + eps * (lse_i - mean_j z_ij)     (0 where y_i == ignore_index)

reduced like ``F.cross_entropy``: "mean" divides the sum by the number of tokens not ignored.

Backward, with s_i = d L / d loss_i (1/count for mean, 1 for sum, the incoming gradient for none)::

    G_ij         = s_i * (softmax(z_i)_j - eps / V - (1 - eps) [j == y_i]) * (1 - (z_ij / c)^2 if softcap)
    grad_hidden  = G @ weight
    grad_weight  = G.T @ hidden

Memory: the forward walks the tokens in chunks of at most 2^26 logits (and at least 8 chunks for
large inputs): a matmul makes a chunk's
logits and one fused kernel reduces them to loss and log-sum-exp; only lse (tokens floats) is
kept. The backward recomputes the logits block by block over the vocab (sized alike at a
time): one fused kernel turns a block into G in place, then grad_weight's rows for the block
are written once (G_b.T @ hidden) and grad_hidden accumulates G_b @ weight_b in float32.
Recomputing costs one extra logits matmul (8 instead of 6 tokens x vocab x hidden FLOPs);
in exchange every reduction, "none" included (whose gradient needs the per-token incoming
gradient, only known in the backward; public fused losses get it wrong), has one tested code
path, nothing but lse is stored between forward and backward, and grad_weight is rounded to
bf16/f16 once rather than once per token chunk.

Small inputs skip the recompute: when a gradient will be needed and the whole (tokens, vocab)
logits take at most 64 MiB (``KEEP_LOGITS_BYTES``; e.g. 512 tokens x 32000 vocab in bfloat16), the
forward runs as one chunk and keeps its logits for the backward (the op
``linear_cross_entropy_keep_logits``), which then starts from them instead of the matmul: one
logits matmul fewer, about a quarter of the loss's forward + backward, for that much memory
held between the two (the backward copies them a vocab block at a time, as it recomputes them).
Not with an explicit ``chunk_size``, nor where the CPU multiplies in float32 copies (bfloat16
below avx512_bf16, float16 always: the kept logits would be rounded).
"""
from __future__ import annotations

import torch

from thrifty.ops._common import register_autocast, register_fake, register_no_double_backward, require_tensors

_ops = torch.ops.thrifty
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
KEEP_LOGITS_BYTES = 64 << 20  # the most logits memory the forward keeps for the backward


@torch.compiler.assume_constant_result  # a constant to torch.compile (no graph break on the extension call)
def _cpu_multiplies_bf16() -> bool:
    """Whether the CPU kernels in use multiply bfloat16 natively (avx512_bf16; below it, in float32 copies)."""
    from thrifty import _C

    return _C.cpu_isa() == "avx512_bf16"


def _keep_logits(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> bool:
    """Whether the forward keeps its logits for the backward (see the module docstring)."""
    if chunk_size != 0 or not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return False
    if weight.dim() != 2:  # bad input: left to the op's checks
        return False
    # the CPU kernels then multiply float32 copies (lce_upcast in loss_glue.h): no logits in hidden's dtype to keep
    if hidden.device.type == "cpu" and (hidden.dtype == torch.float16
                                        or (hidden.dtype != torch.float32 and not _cpu_multiplies_bf16())):
        return False
    return hidden.shape[0] * weight.shape[0] * hidden.element_size() <= KEEP_LOGITS_BYTES


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         softcap: float = 0.0, chunk_size: int = 0) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, never materialising the logits.

    Args:
        hidden: (..., H) float32/bfloat16/float16.
        weight: (V, H), hidden's dtype (the lm_head / tied embedding weight).
        labels: (...) int64, leading dims of hidden; values in [0, V) or ``ignore_index``.
        reduction: "mean" (over tokens not ignored), "sum" or "none" (a loss per token, shape of labels).
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        softcap: > 0 applies ``softcap * tanh(logits / softcap)`` first (Gemma 2 style); 0 disables it.
        chunk_size: tokens per forward chunk and vocab rows per backward block (0: automatic).
    Returns:
        the loss in hidden's dtype (float32 under torch.autocast, as ``F.cross_entropy`` after an autocast
        ``F.linear``; the kernels sum in float32 either way): a scalar, or labels' shape for "none".
    """
    keep_float32 = (torch.is_autocast_enabled(hidden.device.type) and hidden.is_floating_point()
                    and hidden.dtype != torch.float64) if isinstance(hidden, torch.Tensor) else False
    return _linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing, softcap=softcap, chunk_size=chunk_size,
                                 float32_loss=keep_float32)


def _linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = -100, reduction: str = "mean",
                          label_smoothing: float = 0.0, softcap: float = 0.0, chunk_size: int = 0,
                          float32_loss: bool) -> torch.Tensor:
    """linear_cross_entropy's body; float32_loss: return the kernels' float32 loss (the model's loss uses it:
    one rounding to bf16 of a mean loss quantizes the logged losses to steps of ~0.2-0.4%)."""
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"thrifty.linear_cross_entropy: argument 'reduction' must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    require_tensors("thrifty.linear_cross_entropy", hidden=hidden, weight=weight, labels=labels)
    if hidden.dim() < 1 or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"thrifty.linear_cross_entropy: argument 'labels' must have the leading dims of 'hidden' "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    red = _REDUCTIONS[reduction]
    h2 = hidden.reshape(labels.numel(), hidden.shape[-1])  # not (-1, H): ambiguous when H = 0
    l2 = labels.reshape(-1)
    if _keep_logits(h2, weight, int(chunk_size)):
        loss = _ops.linear_cross_entropy_keep_logits(h2, weight, l2, int(ignore_index), red, float(label_smoothing),
                                                     float(softcap))[0]
    else:
        loss = _ops.linear_cross_entropy(h2, weight, l2, int(ignore_index), red, float(label_smoothing),
                                         float(softcap), int(chunk_size))[0]
    if not float32_loss:
        loss = loss.to(hidden.dtype)
    return loss.view(labels.shape) if red == 0 else loss


# ---- fake (shape-only) implementations ----
@register_fake("thrifty::linear_cross_entropy")
def _lce_fake(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap, chunk_size):
    T = hidden.shape[0]
    return (hidden.new_empty((T,) if reduction == 0 else (), dtype=torch.float32),
            hidden.new_empty((T,), dtype=torch.float32))


@register_fake("thrifty::linear_cross_entropy_keep_logits")
def _lce_keep_fake(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap):
    loss, lse = _lce_fake(hidden, weight, labels, ignore_index, reduction, label_smoothing, softcap, 0)
    return loss, lse, hidden.new_empty((hidden.shape[0], weight.shape[0]))


@register_fake("thrifty::linear_cross_entropy_backward")
def _lce_backward_fake(grad_loss, hidden, weight, labels, lse, ignore_index, reduction, label_smoothing, softcap,
                       chunk_size, logits=None):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


# ---- autograd ----
def _setup(ctx, inputs, output):
    hidden, weight, labels, *args = inputs
    ctx.args = args
    ctx.save_for_backward(hidden, weight, labels, output[1])


def _backward(ctx, grad_loss, _grad_lse):
    hidden, weight, labels, lse = ctx.saved_tensors
    grad_h, grad_w = _ops.linear_cross_entropy_backward(grad_loss, hidden, weight, labels, lse, *ctx.args)
    return grad_h, grad_w, None, None, None, None, None, None


torch.library.register_autograd("thrifty::linear_cross_entropy", _backward, setup_context=_setup)


def _setup_keep(ctx, inputs, output):
    hidden, weight, labels, *args = inputs
    ctx.args = args
    ctx.save_for_backward(hidden, weight, labels, output[1], output[2])


def _backward_keep(ctx, grad_loss, _grad_lse, _grad_logits):
    hidden, weight, labels, lse, logits = ctx.saved_tensors
    grad_h, grad_w = _ops.linear_cross_entropy_backward(grad_loss, hidden, weight, labels, lse, *ctx.args, 0, logits)
    return grad_h, grad_w, None, None, None, None, None


torch.library.register_autograd("thrifty::linear_cross_entropy_keep_logits", _backward_keep, setup_context=_setup_keep)
# the LM head matmul in the autocast dtype (as torch's linear before cross_entropy); the loss stays float32
register_autocast("thrifty::linear_cross_entropy", "lower")
register_autocast("thrifty::linear_cross_entropy_keep_logits", "lower")
register_no_double_backward("thrifty::linear_cross_entropy_backward")
