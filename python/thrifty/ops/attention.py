"""Fused exact attention (FlashAttention-style), batched and varlen, with its backward.

Forward, per batch b and head h (kv head ``h // (heads // kv_heads)``: GQA/MQA), never
materialising the seqlen_q x seqlen_k matrix (tiles, online softmax, float32 accumulation)::

    S   = softmax_scale * Q K^T                    (softmax_scale defaults to 1/sqrt(head_dim))
    S   = softcap * tanh(S / softcap)              (if softcap > 0)
    S[i, j] = -inf where key j is not visible to query i (see below)
    lse = logsumexp(S, -1)                         (float32; returned with return_lse=True)
    out = softmax(S) V                             (a row that sees no key: out 0, lse -inf)

Visibility, aligned bottom-right (offset = seqlen_k - seqlen_q, so the last query sits at
the last key, as for a chunk of new queries after a cached prefix)::

    query i sees key j  iff  i + offset - window_left <= j <= i + offset + window_right

with -1 meaning unbounded on that side; ``causal=True`` is ``window_right = 0``.

Backward (recomputing the probabilities P = exp(S - lse) tile by tile), with
D = rowsum(dO * out)::

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - D)        (times 1 - tanh(S_raw / softcap)^2 under softcap)
    dQ = softmax_scale * dS K
    dK = softmax_scale * dS^T Q      (summed over the heads sharing a kv head)

The lse output is not differentiable (it is marked so for autograd).
On CPU the backward is deterministic (fixed split of work, fixed summation order); on CUDA
``deterministic`` follows ``torch.are_deterministic_algorithms_enabled()``.
"""
from __future__ import annotations

import math
import numbers

import torch

from thrifty.ops._common import call_op, register_autocast, register_fake, register_no_double_backward, require_tensors

_ops = torch.ops.thrifty

__all__ = ["flash_attention", "flash_attention_varlen"]


def _window(window) -> tuple[int, int]:
    try:
        wl, wr = window
    except (TypeError, ValueError):
        raise ValueError(f"thrifty.flash_attention: 'window' must be a pair (left, right) of ints >= -1 (got {window!r})") from None
    if isinstance(wl, bool) or isinstance(wr, bool) or not isinstance(wl, numbers.Integral) or \
            not isinstance(wr, numbers.Integral):
        raise ValueError(f"thrifty.flash_attention: 'window' must be a pair (left, right) of ints >= -1 (got {window!r})")
    wl, wr = int(wl), int(wr)  # numpy / other integral types
    if wl < -1 or wr < -1:
        raise ValueError(f"thrifty.flash_attention: 'window' values must be >= -1 (-1 = unbounded), got {window!r}")
    # the op clamps windows past int32 to unbounded; only a value its int64 schema cannot carry is mapped here
    return tuple(-1 if w > 2**63 - 1 else w for w in (wl, wr))


def _scale(q: torch.Tensor, softmax_scale) -> float:
    if softmax_scale is None:
        if q.dim() == 0 or q.shape[-1] == 0:
            return 1.0  # a placeholder: the op refuses the shape of 'q' (rank, head_dim) by name
        return 1.0 / math.sqrt(q.shape[-1])
    return float(softmax_scale)


def _max_seqlen(name: str, value) -> int:
    """A Python int (or any integral scalar); a float or bool is refused rather than truncated. A SymInt (under
    torch.compile with dynamic shapes) passes as it is: int() would specialize the graph to its value, one
    recompile per longest length, as a serving batch changes every step (the schema takes SymInt)."""
    if isinstance(value, bool) or (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)) or \
            (isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()
                                                  or value.dtype == torch.bool or value.numel() != 1)):
        raise TypeError(f"thrifty.flash_attention_varlen: argument '{name}' must be an int (the longest sequence "
                        f"length), got {value!r}")
    return value if isinstance(value, torch.SymInt) else int(value)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over batched sequences of one length.

    Args:
        q: (batch, seqlen_q, heads, head_dim); float32, bfloat16 or float16 (CPU),
            bfloat16 or float16 (CUDA). Only the last dim needs unit stride.
        k, v: (batch, seqlen_k, kv_heads, head_dim), q's dtype and device; heads must be a
            multiple of kv_heads (GQA/MQA).
        causal: mask keys after the bottom-right-aligned diagonal (window_right = 0).
        softmax_scale: multiplies Q K^T; default 1/sqrt(head_dim).
        window: (left, right) sliding window around the diagonal, -1 = unbounded.
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        return_lse: also return lse (batch, heads, seqlen_q) float32. lse carries no gradient (as in
            flash-attn and torch's flash backend): attention merged from chunks by their lse
            (split-KV, ring attention) differentiates only through the outputs.
    Returns:
        out like q (contiguous), or (out, lse).
    """
    require_tensors("thrifty.flash_attention", q=q, k=k, v=v)
    wl, wr = _window(window)
    # max_seqlen 0, 0: the batched kernels read the lengths from q and k (passing q.shape[1] made it a constant
    # of the op call, so torch.compile / torch.export specialized every graph to one sequence length)
    out, lse = call_op(_ops.flash_attention_fwd, q, k, v, None, None, 0, 0, _scale(q, softmax_scale), bool(causal),
                       wl, wr, float(softcap))
    return (out, lse) if return_lse else out


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           softmax_scale: float | None = None, window: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, return_lse: bool = False
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over packed sequences of different lengths (documents packed for
    training, prompts batched for prefill).

    Args:
        q: (total_q, heads, head_dim); k, v: (total_k, kv_heads, head_dim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), starting at 0, non-decreasing:
            sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and
            cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v (zero-length sequences allowed).
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (upper bounds).
        Keywords as in :func:`flash_attention`; masks align each sequence's own diagonal.
    Returns:
        out (total_q, heads, head_dim), or (out, lse) with lse (heads, total_q) float32 (no gradient,
        as in :func:`flash_attention`).
        Rows of q past cu_seqlens_q[-1] get out 0, lse -inf.
    """
    require_tensors("thrifty.flash_attention_varlen", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                    cu_seqlens_k=cu_seqlens_k)
    wl, wr = _window(window)
    out, lse = call_op(_ops.flash_attention_fwd, q, k, v, cu_seqlens_q, cu_seqlens_k,
                       _max_seqlen("max_seqlen_q", max_seqlen_q), _max_seqlen("max_seqlen_k", max_seqlen_k),
                       _scale(q, softmax_scale), bool(causal), wl, wr, float(softcap))
    return (out, lse) if return_lse else out


# ---- fake (shape-only) implementations: torch.compile and meta tensors ----
@register_fake("thrifty::flash_attention_fwd")
def _flash_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                              window_left, window_right, softcap):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if cu_seqlens_q is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@register_fake("thrifty::flash_attention_bwd")
def _flash_attention_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              softmax_scale, causal, window_left, window_right, softcap, deterministic):
    cf = torch.contiguous_format
    return (torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(v, memory_format=cf))


# ---- autograd ----
def _setup_fwd(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr, softcap = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal, wl, wr, softcap)


def _backward_fwd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, causal, wl, wr, softcap = ctx.args
    deterministic = q.device.type == "cpu" or torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = _ops.flash_attention_bwd(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr,
                                          softcap, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("thrifty::flash_attention_fwd", _backward_fwd, setup_context=_setup_fwd)
register_autocast("thrifty::flash_attention_fwd", "lower")  # as torch's scaled_dot_product_attention
register_no_double_backward("thrifty::flash_attention_bwd")
