"""The one attention interface of the model, and its contiguous KV cache.

Every layer calls ``attend(q, k, v, meta, cache, layer)`` and nothing else, so the serving
engine can plug in a paged KV cache (any object with the ``KVCache.update`` method) without
touching the layers.

    q: (batch, seq, heads, head_dim), k/v: (batch, seq, kv_heads, head_dim) (rotary applied),
       or (tokens, heads, head_dim) for packed documents (meta.cu_seqlens set)
    returns the attention output shaped like q.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnMeta:
    """What attention needs besides q, k, v: masking and, for packed input, the document bounds."""
    scale: float
    window: int | None = None             # sliding window (Mistral): keys within window - 1 before the query
    cu_seqlens: torch.Tensor | None = None  # (docs + 1,) int32 offsets of packed documents, causal within each
    max_seqlen: int = 0


class KVCache:
    """Contiguous per-layer K/V cache: (layers, batch, max_len, kv_heads, head_dim). All rows of a batch
    share one length (``pos``), advanced by the model after each forward through every layer."""

    def __init__(self, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        shape = (layers, batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores this step's k, v (batch, n, kv_heads, head_dim) at ``pos``; returns all keys/values so far."""
        end = self.pos + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions exceed the cache length {self.max_len}")
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


def _mask(sq: int, sk: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (sq, sk) mask, causal aligned to the bottom right (the queries are the last sq keys)."""
    qi = torch.arange(sk - sq, sk, device=device)[:, None]
    ki = torch.arange(sk, device=device)[None, :]
    m = ki <= qi
    if window is not None:
        m &= ki > qi - window
    return m


def _sdpa(q, k, v, meta: AttnMeta, mask_needed: bool):
    # (b, s, h, d) -> (b, h, s, d) for SDPA
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    sq, sk = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    if not mask_needed or (sq == 1 and (meta.window is None or sk <= meta.window)):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=mask_needed and sq > 1, scale=meta.scale,
                                             enable_gqa=gqa)
    elif sq == sk and (meta.window is None or sk <= meta.window):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=meta.scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_mask(sq, sk, meta.window, q.device),
                                             scale=meta.scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, cache=None,
           layer: int = 0) -> torch.Tensor:
    """Causal attention of q over k, v (plus what ``cache`` holds for this layer)."""
    if meta.cu_seqlens is not None:
        if cache is not None:
            raise ValueError("attention: packed documents (cu_seqlens) cannot be used with a KV cache")
        return _varlen(q, k, v, meta)
    if cache is not None:
        k, v = cache.update(layer, k, v)
    return _sdpa(q, k, v, meta, True)


def _varlen(q, k, v, meta: AttnMeta):
    # packed documents: one SDPA call over (1, tokens) with a block-diagonal causal mask
    t = q.shape[0]
    doc = torch.searchsorted(meta.cu_seqlens[1:].long(), torch.arange(t, device=q.device), right=True)
    m = _mask(t, t, meta.window, q.device) & (doc[:, None] == doc[None, :])
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, scale=meta.scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
