"""Rotary position embedding (RoPE), neox half-split and GPT-J interleaved, plus its cache.

With the cache row of a token's position ``cos_sin_cache[pos] = [c_0..c_{h-1} | s_0..s_{h-1}]``
(h = rotary_dim / 2, c_i = cos(pos * inv_freq_i), s_i = sin(pos * inv_freq_i)), every pair
(x1, x2) of the first rotary_dim features of each head turns by the angle::

    neox  (interleaved=False): x1 = x[i],  x2 = x[i + h]       (Llama, Mistral, Qwen2, NeoX)
    GPT-J (interleaved=True):  x1 = x[2i], x2 = x[2i + 1]
    x1' = x1 * c_i - x2 * s_i
    x2' = x2 * c_i + x1 * s_i

Features [rotary_dim, head_dim) are copied unchanged. The math runs in float32 and rounds
once to the input dtype.

Backward: a rotation is orthogonal, so the gradient is the inverse rotation (s_i -> -s_i)
of the output gradient: grad_x1 = g1 * c + g2 * s, grad_x2 = g2 * c - g1 * s. No gradient
flows to positions or to the cache.
"""
from __future__ import annotations

import math

import torch

from thrifty.ops._common import call_op, register_fake, register_no_double_backward, require_tensors

_ops = torch.ops.thrifty


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies rotary position embedding to q and k; returns new tensors (q and k are untouched).

    Args:
        q: (tokens, heads, head_dim) or (batch, seq, heads, head_dim) (any leading dims),
            float32/bfloat16/float16, last dim contiguous (other strides free: slices of a
            fused qkv projection are read in place).
        k: like q with the same leading dims and head_dim; may have fewer heads (GQA/MQA).
        positions: int64 or int32 with the leading dims of q ((tokens,) or (batch, seq)):
            the position of each token, each in [0, max_position) (else ValueError).
        cos_sin_cache: (max_position, rotary_dim) float32, cos in the first half of each row
            and sin in the second (see :func:`build_rotary_cache`); rotary_dim even and
            <= head_dim; only the first rotary_dim features rotate.
        interleaved: False for neox half-split pairs (i, i + rotary_dim/2), True for GPT-J
            pairs (2i, 2i+1).
    Returns:
        (q_rot, k_rot), contiguous, shapes and dtype of q and k.
    """
    require_tensors("thrifty.rotary_embedding", q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    if cos_sin_cache.requires_grad and torch.is_grad_enabled():
        raise ValueError("thrifty.rotary_embedding: argument 'cos_sin_cache' must not require grad "
                         "(no gradient flows to the cache; pass cos_sin_cache.detach())")
    return call_op(_ops.rotary_embedding, q, k, positions, cos_sin_cache, interleaved)


_ROPE_TYPES = ("default", "linear", "llama3")


def _require(scaling: dict, key: str, rope_type: str):
    if key not in scaling:
        raise ValueError(f"thrifty.build_rotary_cache: scaling of rope_type '{rope_type}' needs the key '{key}' "
                         f"(got keys {sorted(scaling)})")
    return scaling[key]


def rotary_inv_freq(rotary_dim: int, base: float = 10000.0, scaling: dict | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The (rotary_dim/2,) float32 inverse frequencies, computed exactly as Hugging Face
    transformers does for rope_type default, "linear" and "llama3"."""
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"thrifty.build_rotary_cache: 'rotary_dim' must be a positive even int (got {rotary_dim!r})")
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
        raise ValueError(f"thrifty.build_rotary_cache: 'base' must be a finite number > 0 (got {base!r})")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
                               / rotary_dim))
    if scaling is None:
        return inv_freq
    if not isinstance(scaling, dict):
        raise TypeError(f"thrifty.build_rotary_cache: 'scaling' must be None or a dict in the Hugging Face "
                        f"rope_scaling format (got {type(scaling).__name__})")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"thrifty.build_rotary_cache: unsupported rope_type '{rope_type}' "
                         f"(supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return inv_freq
    factor = float(_require(scaling, "factor", rope_type))
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"thrifty.build_rotary_cache: scaling 'factor' must be finite and > 0 (got {factor})")
    if rope_type == "linear":
        # positions / factor, applied to the frequencies as transformers does
        return inv_freq / factor
    # llama3 (transformers' _compute_llama3_parameters)
    low_freq_factor = _require(scaling, "low_freq_factor", rope_type)
    high_freq_factor = _require(scaling, "high_freq_factor", rope_type)
    old_context_len = _require(scaling, "original_max_position_embeddings", rope_type)
    if high_freq_factor == low_freq_factor:
        raise ValueError("thrifty.build_rotary_cache: llama3 scaling needs high_freq_factor != low_freq_factor "
                         f"(got both {low_freq_factor})")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def build_rotary_cache(rotary_dim: int, max_position: int, base: float = 10000.0, scaling: dict | None = None,
                       dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The (max_position, rotary_dim) cos/sin cache of :func:`rotary_embedding`.

    Row p is ``[cos(p * inv_freq) | sin(p * inv_freq)]`` with inv_freq = base^(-2i/rotary_dim)
    (i < rotary_dim/2), modified by ``scaling``: None, or a dict in the Hugging Face
    rope_scaling format with "rope_type" (or the older "type") one of "default",
    "linear" ({"factor"}: positions / factor) or "llama3" ({"factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}: Llama 3.1 frequency scaling).
    inv_freq is computed in float32 exactly as transformers does; the angles and their
    cos/sin in float64, then cast to ``dtype`` (the op needs float32).
    """
    if not isinstance(max_position, int) or max_position <= 0:
        raise ValueError(f"thrifty.build_rotary_cache: 'max_position' must be a positive int (got {max_position!r})")
    inv_freq = rotary_inv_freq(rotary_dim, base, scaling, device=device)
    t = torch.arange(max_position, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq.double())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


# ---- fake (shape-only) implementations ----
@register_fake("thrifty::rotary_embedding")
def _rotary_fake(q, k, positions, cos_sin_cache, interleaved):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@register_fake("thrifty::rotary_embedding_backward")
def _rotary_backward_fake(grad_q, grad_k, positions, cos_sin_cache, interleaved):
    return (torch.empty_like(grad_q, memory_format=torch.contiguous_format),
            torch.empty_like(grad_k, memory_format=torch.contiguous_format))


# ---- autograd ----
def _setup_rotary(ctx, inputs, output):
    q, k, positions, cache, interleaved = inputs
    ctx.save_for_backward(positions, cache)
    ctx.interleaved = interleaved
    ctx.q_meta = (q.shape, q.dtype, q.device)
    ctx.k_meta = (k.shape, k.dtype, k.device)


def _backward_rotary(ctx, grad_q, grad_k):
    positions, cache = ctx.saved_tensors
    if grad_q is None:
        grad_q = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=ctx.q_meta[2])
    if grad_k is None:
        grad_k = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=ctx.k_meta[2])
    gq, gk = _ops.rotary_embedding_backward(grad_q, grad_k, positions, cache, ctx.interleaved)
    return gq, gk, None, None, None


torch.library.register_autograd("thrifty::rotary_embedding", _backward_rotary, setup_context=_setup_rotary)
register_no_double_backward("thrifty::rotary_embedding_backward")
