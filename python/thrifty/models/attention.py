"""The one attention interface of the model, and its contiguous KV cache.

Every layer calls ``attend(q, k, v, meta, cache, layer)`` and nothing else, so the serving
engine can plug in a paged KV cache without touching the layers. A cache is any object with

- ``update(layer, k, v) -> (k_all, v_all)`` and ``advance(n)`` (``KVCache``): every sequence of the
  batch has one length; or
- ``update_varlen(layer, k, v, cu_seqlens) -> (k_all, v_all, cu_seqlens_k, max_seqlen_k)`` and
  ``advance_varlen(cu_seqlens)`` (``RaggedKVCache``): packed queries (the model called with
  cu_seqlens and explicit positions), each sequence with its own cached length, so one forward
  can mix prefill chunks and decode steps of different sequences (continuous batching).

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


class RaggedKVCache:
    """Per-sequence K/V cache for packed (varlen) forwards: slot b holds sequence b's keys at rows
    0 .. lengths[b] of (layers, batch, max_len, kv_heads, head_dim). Each forward appends cu_seqlens'
    tokens of sequence b after its own cached ones; a sequence with no new tokens keeps its cache and
    takes no part (0 queries). The reference form of the protocol a paged cache implements: it
    gathers the cached keys into one packed tensor per layer and call, which a paged kernel reading
    the pages in place would not need."""

    def __init__(self, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        shape = (layers, batch, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * batch  # host ints: the cached length of each sequence
        self.max_len = max_len
        self._step_plan = None  # this forward's indices (_plan), shared by its layers

    def _plan(self, cu_seqlens) -> dict:
        """What every layer of one forward needs, worked out once per step (cu_seqlens read to the host once, the
        index tensors built once): the new tokens per sequence, where they go in the (batch * max_len) rows of a
        layer's slots, which rows hold the keys after them, and their cu_seqlens."""
        plan = self._step_plan
        if plan is not None and plan["cu"] is cu_seqlens and plan["lengths"] == self.lengths:
            return plan
        cu_t = torch.as_tensor(cu_seqlens)
        if cu_t.dtype.is_floating_point or cu_t.dtype == torch.bool or cu_t.dim() != 1:
            raise ValueError(f"RaggedKVCache: cu_seqlens must be 1-D integer offsets, got {cu_t.dtype} "
                             f"of shape {tuple(cu_t.shape)}")
        cu = cu_t.tolist()
        if len(cu) != len(self.lengths) + 1:
            raise ValueError(f"RaggedKVCache: cu_seqlens must have batch + 1 = {len(self.lengths) + 1} offsets (one "
                             f"per cache slot), got {len(cu)}")
        new = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if cu[0] != 0 or min(new, default=0) < 0:
            raise ValueError(f"RaggedKVCache: cu_seqlens must start at 0 and never decrease, got {cu}")
        total = [have + n for have, n in zip(self.lengths, new)]
        for b, t in enumerate(total):
            if t > self.max_len:
                raise ValueError(f"RaggedKVCache: sequence {b}: {t} positions exceed the cache length {self.max_len}")
        m, dev = self.max_len, self.k.device
        rows = [(b * m + have, b * m + t) for b, (have, t) in enumerate(zip(self.lengths, total))]
        plan = {"cu": cu_seqlens, "lengths": list(self.lengths), "new": new, "max_k": max(total, default=0),
                "positions": torch.cat([torch.arange(have, t) for have, t in zip(self.lengths, total)]).to(cu_t.device),
                "dst": torch.cat([torch.arange(a, b) for a, b in rows]).to(dev),
                "keep": torch.cat([torch.arange(b * m, end) for b, (_, end) in enumerate(rows)]).to(dev),
                "cu_k": torch.tensor([0] + total, dtype=torch.int64).cumsum(0).to(dtype=torch.int32, device=dev)}
        self._step_plan = plan
        return plan

    def positions(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The position of each packed token (its sequence's cached length + its offset in this step)."""
        return self._plan(cu_seqlens)["positions"]

    def update_varlen(self, layer: int, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor):
        """Stores the packed k, v (tokens, kv_heads, head_dim) after each sequence's cached rows; returns
        every sequence's keys and values packed, their cu_seqlens (int32) and the longest length."""
        plan = self._plan(cu_seqlens)
        n = sum(plan["new"])
        if not 0 <= layer < self.k.shape[0]:
            raise ValueError(f"RaggedKVCache: layer {layer} of a cache for {self.k.shape[0]} layers")
        for name, t in (("k", k), ("v", v)):
            if t.dtype != self.k.dtype or tuple(t.shape[1:]) != tuple(self.k.shape[3:]) or t.shape[0] != n:
                raise ValueError(f"RaggedKVCache: {name} must be ({n}, {self.k.shape[3]}, {self.k.shape[4]}) "
                                 f"{self.k.dtype} as the cache holds, got {tuple(t.shape)} {t.dtype}")
        kf, vf = self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)
        kf.index_copy_(0, plan["dst"], k)
        vf.index_copy_(0, plan["dst"], v)
        return kf.index_select(0, plan["keep"]), vf.index_select(0, plan["keep"]), plan["cu_k"], plan["max_k"]

    def advance_varlen(self, cu_seqlens: torch.Tensor) -> None:
        new = self._plan(cu_seqlens)["new"]
        self.lengths = [have + n for have, n in zip(self.lengths, new)]
        self._step_plan = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, cache=None,
           layer: int = 0) -> torch.Tensor:
    """Causal attention of q over k, v (plus what ``cache`` holds for this layer), through
    thrifty.ops.flash_attention (masks aligned bottom-right: the queries are the last keys)."""
    window = (meta.window - 1 if meta.window else -1, 0)
    if meta.cu_seqlens is not None:
        cu_k, max_k = meta.cu_seqlens, meta.max_seqlen
        if cache is not None:  # a varlen cache (checked by the model): the queries are each sequence's last keys
            k, v, cu_k, max_k = cache.update_varlen(layer, k, v, meta.cu_seqlens)
        return flash_attention_varlen(q, k, v, meta.cu_seqlens, cu_k, meta.max_seqlen, max_k,
                                      causal=True, softmax_scale=meta.scale, window=window)
    if cache is not None:
        k, v = cache.update(layer, k, v)
    return flash_attention(q, k, v, causal=True, softmax_scale=meta.scale, window=window)
