"""Benchmarks of the foundation's fused ops (issue 2): RMSNorm forward and backward, fused
add+RMSNorm, rotary embedding and SwiGLU, each against PyTorch in the same process.

Baselines: torch.nn.functional.rms_norm for the norm forward; the eager PyTorch composite
(the plain formula, differentiated by autograd) for the backward passes, rotary and SwiGLU.
``bytes`` is the fewest bytes each op must move (inputs read once, outputs written once).
Backward timings call torch.autograd.grad on a retained graph, for thrifty and torch alike; the
"(op alone)" rows time thrifty's backward op itself, without the autograd engine around it (no
baseline): the kernels' own share of the copy bandwidth, which the autograd rows understate for
short kernels (the engine's own time per call is in them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import thrifty
from thrifty.bench.common import Bench


def _es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _grad_fn(out, inputs, grad):
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def _rms_eager(x, w, eps=1e-6):
    # the Hugging Face LlamaRMSNorm formula (float32 inside)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope_eager(q, k, pos, cache):
    # gather the cos/sin rows and apply them as Hugging Face's apply_rotary_pos_emb does
    h = cache.shape[1] // 2
    row = cache[pos]
    cos = torch.cat([row[:, :h], row[:, :h]], -1).to(q.dtype)[:, None]
    sin = torch.cat([row[:, h:], row[:, h:]], -1).to(q.dtype)[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def run(device, quick: bool = False) -> Bench:
    device = torch.device(device)
    b = Bench("norm", device, quick=quick)
    cuda = device.type == "cuda"
    gen = dict(device=device)

    # ---- rms_norm forward / backward, fused add ----
    rows, hidden = (1024, 1024) if quick else ((16384, 4096) if cuda else (4096, 4096))
    norm_dtypes = [torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    for dt in norm_dtypes:
        es = _es(dt)
        n = rows * hidden
        shape = f"{rows}x{hidden}"
        x = torch.randn(rows, hidden, dtype=dt, **gen)
        w = torch.randn(hidden, dtype=dt, **gen)
        b.case(op="rms_norm fwd", shape=shape, dtype=dt, thrifty=lambda: thrifty.ops.rms_norm(x, w),
               torch_fn=lambda: F.rms_norm(x, (hidden,), w, 1e-6), bytes=2 * n * es + 4 * rows,
               baseline="F.rms_norm")
        r = torch.randn_like(x)

        def eager_add():
            h = x + r
            return F.rms_norm(h, (hidden,), w, 1e-6), h

        b.case(op="fused add+rms_norm fwd", shape=shape, dtype=dt,
               thrifty=lambda: thrifty.ops.rms_norm(x, w, residual=r), torch_fn=eager_add,
               bytes=4 * n * es + 4 * rows, baseline="x+r, F.rms_norm")
        xg = x.clone().requires_grad_()
        wg = w.clone().requires_grad_()
        gy = torch.randn_like(x)
        y_t = thrifty.ops.rms_norm(xg, wg)
        y_e = _rms_eager(xg, wg)
        b.case(op="rms_norm bwd", shape=shape, dtype=dt, thrifty=_grad_fn(y_t, (xg, wg), gy),
               torch_fn=_grad_fn(y_e, (xg, wg), gy), bytes=3 * n * es + 4 * rows, baseline="eager autograd")
        # the backward op alone (no autograd engine around it): the kernels' own share of copy bandwidth
        _, rstd = torch.ops.thrifty.rms_norm(x, w, 1e-6)
        b.case(op="rms_norm bwd (op alone)", shape=shape, dtype=dt,
               thrifty=lambda: torch.ops.thrifty.rms_norm_backward(gy, x, w, rstd, None), bytes=3 * n * es + 4 * rows)
        del x, r, xg, wg, gy, y_t, y_e, rstd

    # ---- rotary: tokens x (32 q heads, 8 k heads) x 128 ----
    tokens = 256 if quick else (16384 if cuda else 4096)
    hq, hk, d = 32, 8, 128
    cache = thrifty.ops.build_rotary_cache(d, 8192, device=device)
    rope_dtypes = [torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    for dt in rope_dtypes:
        es = _es(dt)
        q = torch.randn(tokens, hq, d, dtype=dt, **gen)
        k = torch.randn(tokens, hk, d, dtype=dt, **gen)
        pos = torch.randint(0, 8192, (tokens,), device=device)
        nbytes = 2 * tokens * (hq + hk) * d * es + tokens * (d * 4 + 8)
        shape = f"{tokens}x({hq}+{hk})x{d}"
        b.case(op="rotary fwd", shape=shape, dtype=dt,
               thrifty=lambda: thrifty.ops.rotary_embedding(q, k, pos, cache),
               torch_fn=lambda: _rope_eager(q, k, pos, cache), bytes=nbytes, baseline="eager composite")
        if dt == torch.bfloat16:
            qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
            gq, gk = torch.randn_like(q), torch.randn_like(k)
            out_t = thrifty.ops.rotary_embedding(qg, kg, pos, cache)
            out_e = _rope_eager(qg, kg, pos, cache)
            b.case(op="rotary bwd", shape=shape, dtype=dt, thrifty=_grad_fn(out_t, (qg, kg), (gq, gk)),
                   torch_fn=_grad_fn(out_e, (qg, kg), (gq, gk)), bytes=nbytes, baseline="eager autograd")
            b.case(op="rotary bwd (op alone)", shape=shape, dtype=dt,
                   thrifty=lambda: torch.ops.thrifty.rotary_embedding_backward(gq, gk, pos, cache, False), bytes=nbytes)
            del qg, kg, gq, gk, out_t, out_e
        del q, k

    # ---- swiglu: tokens x intermediate ----
    srows, inter = (512, 1024) if quick else ((8192, 14336) if cuda else (4096, 14336))
    sw_dtypes = [torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    for dt in sw_dtypes:
        es = _es(dt)
        n = srows * inter
        shape = f"{srows}x{inter}"
        g = torch.randn(srows, inter, dtype=dt, **gen)
        u = torch.randn(srows, inter, dtype=dt, **gen)
        b.case(op="swiglu fwd", shape=shape, dtype=dt, thrifty=lambda: thrifty.ops.swiglu(g, u),
               torch_fn=lambda: F.silu(g) * u, bytes=3 * n * es, baseline="F.silu(g)*u")
        if dt == torch.bfloat16 or not cuda:
            gg, ug = g.clone().requires_grad_(), u.clone().requires_grad_()
            go = torch.randn_like(g)
            o_t = thrifty.ops.swiglu(gg, ug)
            o_e = F.silu(gg) * ug
            b.case(op="swiglu bwd", shape=shape, dtype=dt, thrifty=_grad_fn(o_t, (gg, ug), go),
                   torch_fn=_grad_fn(o_e, (gg, ug), go), bytes=5 * n * es, baseline="eager autograd")
            del gg, ug, go, o_t, o_e
        del g, u
    return b
