"""Functional drop-ins for torch.nn.functional built on thrifty's fused ops."""
from __future__ import annotations

import functools
import math
import numbers

import torch

from thrifty.ops.attention import flash_attention

__all__ = ["scaled_dot_product_attention"]

_NAME = "thrifty.nn.functional.scaled_dot_product_attention"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 256  # the kernels' head_dim limit (CPU and CUDA); E and Ev are padded to max(E, Ev)


_TORCH_NAMES = (("query", "q"), ("key", "k"), ("value", "v"))


def _taking_torch_names(fn):
    """Issue 3 names the tensors q, k, v; torch names them query, key, value: both are taken by keyword.
    Issue 3's positional order has is_causal 5th, torch's has dropout_p 5th: a number that is not a bool in
    that place is torch's dropout_p, and the arguments after it follow torch's order (is_causal, scale,
    enable_gqa), so a torch call runs unchanged. (functools.wraps: the signature and docstring shown are fn's,
    and Python's own argument errors name it.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        fifth = args[4] if len(args) >= 5 else None
        if isinstance(fifth, torch.Tensor) and fifth.dim() == 0 and fifth.is_floating_point():
            fifth = float(fifth)  # torch takes a 0-d tensor as dropout_p too
            args = args[:4] + (fifth,) + args[5:]
        if isinstance(fifth, numbers.Real) and not isinstance(fifth, bool):
            if "dropout_p" in kwargs:
                raise TypeError(f"{_NAME}: got dropout_p both as the 5th positional argument (torch's order) and "
                                "by keyword")
            kwargs["dropout_p"] = args[4]
            args = args[:4] + args[5:]
        for torch_name, name in _TORCH_NAMES:
            if torch_name in kwargs:
                if name in kwargs:
                    raise TypeError(f"{_NAME}: got both '{name}' and its torch name '{torch_name}'")
                kwargs[name] = kwargs.pop(torch_name)
        return fn(*args, **kwargs)

    return wrapper


@_taking_torch_names
def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False, *,
                                 dropout_p: float = 0.0) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on thrifty's fused
    kernel, with torch's layout and conventions.

    Args:
        q: (..., heads, L, E); k: (..., kv_heads, S, E); v: (..., kv_heads, S, Ev), torch's query, key and
            value (those names are taken by keyword too; the messages below use them) (a 3-D
            input is (heads, L, E) and a 2-D one (L, E), as in torch). Ev may differ from E, as in torch (the
            smaller side is zero-padded to max(E, Ev) <= 256 for the kernel: exact, at the larger
            size's cost). The batch dims ``...`` broadcast as in torch, across ranks too (a 3-D query
            against 4-D key/value). float32, bfloat16 or float16, one dtype and device.
        attn_mask: only None is fused; any mask is refused with a ValueError (no silent slow path).
        is_causal: torch's convention: query i sees keys j <= i (top-left aligned, also when L != S).
        scale: default 1/sqrt(E); any finite value, as in torch (the kernels take a positive scale:
            a negative one runs as (-q) with |scale|, 0 as q * 0 with scale 1, uniform over the visible keys).
        enable_gqa: as torch: heads may be a multiple of kv_heads (each kv head serves
            heads // kv_heads consecutive query heads); without it the head dims broadcast as torch
            broadcasts them: equal, or one of them 1 (kv_heads 1, or a single query head against
            kv_heads heads, giving kv_heads output heads).
        dropout_p: accepted by keyword so that torch-style calls (``dropout_p=0.0``, what Hugging
            Face passes outside training) run unchanged; only 0 is supported (dropout is not
            fused: a nonzero value is a ValueError).
    Returns:
        (..., heads, L, Ev) in query's dtype (the broadcast batch dims and heads), contiguous as torch's CPU
        result is (so ``.view`` on it works; the kernel writes (..., L, heads, Ev), and the copy costs ~1/S of
        the attention itself).

    Positional order: issue 3's (q, k, v, attn_mask, is_causal, scale, enable_gqa), and torch's
    (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) too: a number that is
    not a bool in the 5th place is torch's dropout_p (so ``f(q, k, v, None, 0.0, True)`` is causal,
    as in torch), a bool is is_causal.
    """
    query, key, value = q, k, v
    if isinstance(is_causal, float) or (isinstance(is_causal, torch.Tensor) and is_causal.dtype != torch.bool):
        raise TypeError(f"{_NAME}: 'is_causal' must be a bool (got {is_causal!r}); in the 5th positional place a bool "
                        "is is_causal (the issue's order) and a number torch's dropout_p")
    if isinstance(scale, bool):
        raise TypeError(f"{_NAME}: 'scale' must be a float or None (got {scale!r})")
    if scale is not None and not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"{_NAME}: 'scale' must be a finite number or None (got {scale!r})")
    if dropout_p != 0.0:
        raise ValueError(f"{_NAME}: dropout is not fused into the kernel: 'dropout_p' must be 0.0 (got {dropout_p}); "
                         "use torch.nn.functional.scaled_dot_product_attention for attention dropout")
    if attn_mask is not None:
        raise ValueError(f"{_NAME}: attn_mask cannot be fused into the kernel (only attn_mask=None, with or without "
                         f"is_causal, is supported); got a mask of shape {tuple(attn_mask.shape)}. Express causal or "
                         "sliding-window masks with is_causal or thrifty.ops.flash_attention(window=...).")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_NAME}: argument '{name}' must be a tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{_NAME}: argument '{name}' must have dtype float32, bfloat16 or float16 (got {t.dtype})")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"{_NAME}: query, key and value must have one dtype; got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise RuntimeError(f"{_NAME}: query, key and value must be on one device; got {query.device}, {key.device}, "
                           f"{value.device}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise ValueError(f"{_NAME}: query, key and value must each have at least 2 dims, (..., heads, L, E); got "
                         f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{_NAME}: key must have the embedding size E of query ({query.shape[-1]}), got key "
                         f"{tuple(key.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{_NAME}: key and value must have the same heads and length S: {tuple(key.shape)} vs "
                         f"{tuple(value.shape)}")
    if max(query.shape[-1], value.shape[-1]) > _MAX_HEAD_DIM:
        raise ValueError(f"{_NAME}: the embedding sizes E of query/key ({query.shape[-1]}) and Ev of value "
                         f"({value.shape[-1]}) must be <= {_MAX_HEAD_DIM} (the fused kernel's head_dim limit)")
    # torch broadcasts every dim but the last two, inputs of lower rank included (a 3-D query against a
    # 4-D key): pad the ranks to one (at least 4: a 3-D input is (heads, L, E), a 2-D one (L, E))
    rank = max(query.dim(), key.dim(), value.dim())
    q, k, v = query, key, value
    q, k, v = (t.reshape((1,) * (max(rank, 4) - t.dim()) + tuple(t.shape)) for t in (q, k, v))
    # batch dims broadcast as in torch (an expanded view: stride 0, no copy)
    try:
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise ValueError(f"{_NAME}: the batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} do not broadcast") from None
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if hk != hv and 1 not in (hk, hv):
        raise ValueError(f"{_NAME}: key and value must have the same heads and length S (a head dim of 1 "
                         f"broadcasts, as in torch): {tuple(key.shape)} vs {tuple(value.shape)}")
    hkv = max(hk, hv) if 0 not in (hk, hv) else 0
    if hq != hkv and hkv != 1:  # kv_heads 1 broadcasts with or without enable_gqa, as in torch
        if hq == 1 and not enable_gqa:  # a single query head broadcasts over the kv heads, as in torch
            hq = hkv
        elif not enable_gqa:
            raise ValueError(f"{_NAME}: query has {hq} heads and key/value {hkv}; pass enable_gqa=True for "
                             "grouped-query attention")
        elif hkv == 0 or hq % hkv != 0:
            raise ValueError(f"{_NAME}: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    q = q if q.shape[:-2] == (*lead, hq) else q.expand(*lead, hq, *q.shape[-2:])
    k = k if k.shape[:-2] == (*lead, hkv) else k.expand(*lead, hkv, *k.shape[-2:])
    v = v if v.shape[:-2] == (*lead, hkv) else v.expand(*lead, hkv, *v.shape[-2:])
    hk = hkv
    L, S = q.shape[-2], k.shape[-2]
    E, Ev = q.shape[-1], v.shape[-1]
    # to (batch, seq, heads, E) views (no copy: only the last dim needs unit stride)
    nb = math.prod(lead)
    q4 = q.reshape(nb, hq, L, E).transpose(1, 2)
    k4 = k.reshape(nb, hk, S, E).transpose(1, 2)
    v4 = v.reshape(nb, hk, S, Ev).transpose(1, 2)
    if Ev < E:  # zero columns of V give zero output columns, cut below
        v4 = torch.nn.functional.pad(v4, (0, E - Ev))
    elif Ev > E:  # zero features of Q and K leave every score as it is (the scale stays 1/sqrt(E))
        q4, k4 = (torch.nn.functional.pad(t, (0, Ev - E)) for t in (q4, k4))
    window = (-1, -1)
    causal = False
    if is_causal:
        # torch aligns causal top-left: query i sees keys j <= i. thrifty aligns bottom-right
        # (j <= i + S - L + right), so: L >= S is window right = L - S; L < S sees no key past
        # L - 1, so the keys are cut to the first L and the diagonals coincide.
        if L >= S:
            window = (-1, L - S)
        else:
            k4, v4 = k4[:, :L], v4[:, :L]
            causal = True
    sc = 1.0 / math.sqrt(E) if scale is None else float(scale)
    if sc < 0:  # q.k * s = (-q).k * |s|; autograd carries the sign back to q
        q4, sc = -q4, -sc
    elif sc == 0:  # every score 0: softmax uniform over the visible keys, no gradient to q or k
        q4, sc = q4 * 0, 1.0
    out = flash_attention(q4, k4, v4, causal=causal, softmax_scale=sc, window=window)
    if Ev < E:
        out = out[..., :Ev]
    out = out.transpose(1, 2).contiguous()  # (batch, heads, L, Ev)
    out = out.reshape(*lead, hq, L, Ev)
    for _ in range(4 - min(rank, 4)):
        out = out.squeeze(0)
    return out
