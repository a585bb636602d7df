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

from thrifty.ops import flash_attention, flash_attention_varlen


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, cache=None,
           layer: int = 0) -> torch.Tensor:
    """Causal attention of q over k, v (plus what ``cache`` holds for this layer), through
    thrifty.ops.flash_attention (masks aligned bottom-right: the queries are the last keys)."""
    window = (meta.window - 1 if meta.window else -1, 0)
    if meta.cu_seqlens is not None:
        if cache is not None:
            raise ValueError("attention: packed documents (cu_seqlens) cannot be used with a KV cache")
        return flash_attention_varlen(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                                      causal=True, softmax_scale=meta.scale, window=window)
    if cache is not None:
        k, v = cache.update(layer, k, v)
    return flash_attention(q, k, v, causal=True, softmax_scale=meta.scale, window=window)
