"""Fused attention benchmark: thrifty vs torch.nn.functional.scaled_dot_product_attention in
the same run. FLOPs counted the FlashAttention way: forward 4 * b * s^2 * h * d (halved for
causal), backward 2.5x the forward (so forward+backward is 3.5x).

CPU: batch 1, 8 heads, seqlen 2048 and 8192, head_dim 64 and 128, causal and not; float32
forward, bfloat16 forward, float32 and bfloat16 forward+backward (quick: seqlen 2048 only); decode (one query row per
sequence over a 512-32k key cache, Llama-3-8B heads, bfloat16).
CUDA: head_dim 128, bfloat16, seqlen 1k..16k, causal and not (few cases).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import thrifty
from thrifty.bench.common import Bench


def _flops(b, s, h, d, causal):
    f = 4.0 * b * s * s * h * d
    return f / 2 if causal else f


def _inputs(b, s, h, d, dtype, device, requires_grad=False):
    # thrifty layout (b, s, h, d); torch's SDPA gets transposed views of the same data
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(3))
    return q, k, v


def _cases(b, seqs, dims, causals, dtypes, kinds, bench: Bench):
    dev = bench.device
    for kind in kinds:
        for dtype in dtypes:
            for s in seqs:
                for d in dims:
                    for causal in causals:
                        h = 8 if dev.type == "cpu" else max(1, 2048 // d) if s <= 4096 else 16
                        grad = kind == "fwd+bwd"
                        q, k, v = _inputs(b, s, h, d, dtype, dev, grad)
                        qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(grad) for t in (q, k, v))
                        flops = _flops(b, s, h, d, causal) * (3.5 if grad else 1.0)
                        if grad:
                            go = torch.randn_like(q)
                            got = go.transpose(1, 2)

                            def th(q=q, k=k, v=v, go=go, causal=causal):
                                thrifty.ops.flash_attention(q, k, v, causal=causal).backward(go)
                                q.grad = k.grad = v.grad = None

                            def tt(q=qt, k=kt, v=vt, go=got, causal=causal):
                                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(go)
                                q.grad = k.grad = v.grad = None
                        else:
                            def th(q=q, k=k, v=v, causal=causal):
                                with torch.no_grad():
                                    thrifty.ops.flash_attention(q, k, v, causal=causal)

                            def tt(q=qt, k=kt, v=vt, causal=causal):
                                with torch.no_grad():
                                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        bench.case(op=f"attention {kind}{' causal' if causal else ''}", shape=f"b{b} h{h} s{s} d{d}",
                                   dtype=dtype, thrifty=th, torch_fn=tt, flops=flops,
                                   baseline="torch SDPA")


def _decode_cases(seqs, bench: Bench):
    """One new query row per sequence against a cache of s keys (serving's decode step): Llama-3-8B heads
    (32 query heads over 8 KV heads, head_dim 128), bfloat16; bound by reading the cache (bytes = K + V)."""
    dev, h, hk, d, dtype = bench.device, 32, 8, 128, torch.bfloat16
    for s in seqs:
        q = torch.randn(1, 1, h, d, dtype=dtype, device=dev)
        k, v = (torch.randn(1, s, hk, d, dtype=dtype, device=dev) for _ in range(2))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def th(q=q, k=k, v=v):
            with torch.no_grad():
                thrifty.ops.flash_attention(q, k, v, causal=True)

        def tt(q=qt, k=kt, v=vt):
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        bench.case(op="attention decode", shape=f"b1 h{h}/{hk} 1x{s} d{d}", dtype=dtype, thrifty=th, torch_fn=tt,
                   bytes=2.0 * s * hk * d * k.element_size(), baseline="torch SDPA")


def run(device, quick: bool = False) -> Bench:
    device = torch.device(device)
    bench = Bench("attention", device, quick=quick)
    if device.type == "cuda":
        seqs = [1024, 4096] if quick else [1024, 4096, 16384]
        _cases(1 if quick else 2, seqs, [128], [False, True], [torch.bfloat16], ["fwd", "fwd+bwd"], bench)
        return bench
    seqs = [2048] if quick else [2048, 8192]
    _cases(1, seqs, [64, 128], [False, True], [torch.float32, torch.bfloat16], ["fwd"], bench)
    _cases(1, seqs, [64, 128], [False, True], [torch.float32, torch.bfloat16], ["fwd+bwd"], bench)
    _decode_cases([4096] if quick else [512, 4096, 32768], bench)
    return bench
