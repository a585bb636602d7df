"""CUDA FlashAttention kernels (torch.ops.thrifty.flash_attention_fwd / _bwd on CUDA) against a
float64 reference softmax(scale * Q K^T) V computed on the GPU, forward and backward.

Accuracy rule: the kernel's max error against float64 is at most 2x the error that PyTorch's own
low-precision attention (SDPA with the same boolean mask; an explicit low-precision softmax(QK^T)V
for softcap) makes on the same inputs, plus a small absolute floor. Every test here is marked
`cuda` (skipped without a GPU and a CUDA build). Whole file: about 45 s on an H100.
A torch-free twin of these checks (kernels only, float64 CPU reference, plus timings) lives in
tests/cuda_standalone/ (build.sh, then build/flash_check [--bench]).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import thrifty  # noqa: F401  (loads the ops)

pytestmark = pytest.mark.cuda
OPS = torch.ops.thrifty
DEV = "cuda"


def visible_mask(sq: int, sk: int, causal: bool, wl: int, wr: int, device=DEV) -> torch.Tensor:
    """(sq, sk) bool: query i sees key j (bottom-right aligned diagonal, see attention_params.h)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    off = sk - sq
    if causal:
        wr = 0
    m = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if wl >= 0:
        m &= j >= i + off - wl
    if wr >= 0:
        m &= j <= i + off + wr
    return m


def ref_attention(q, k, v, *, causal=False, wl=-1, wr=-1, softcap=0.0, scale=None, upcast=True):
    """Batched (b, s, h, d) reference. upcast: float64 math; else the inputs' dtype (PyTorch's
    low-precision error). Returns out (like q) and lse (b, h, sq) float64/float32."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = torch.float64 if upcast else q.dtype
    qt, kt, vt = (x.to(dt).transpose(1, 2) for x in (q, k, v))  # (b, h, s, d)
    kt = kt.repeat_interleave(h // hk, dim=1)
    vt = vt.repeat_interleave(h // hk, dim=1)
    mask = visible_mask(sq, sk, causal, wl, wr, q.device)
    if not upcast and softcap == 0.0 and bool(mask.any(-1).all()):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        s = (qt.float() @ kt.float().transpose(-1, -2)) * scale
        lse = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
        return out.transpose(1, 2), lse
    s = (qt @ kt.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.float() if not upcast else s
    rowany = mask.any(-1, keepdim=True)  # rows with no visible key: out 0, lse -inf (NaN-free grads)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~rowany, 0.0)
    lse = s.logsumexp(-1).masked_fill(~rowany[..., 0], float("-inf"))
    p = torch.softmax(s, -1) * rowany
    out = p.to(dt) @ vt
    return out.transpose(1, 2), lse


def fwd(q, k, v, *, causal=False, wl=-1, wr=-1, softcap=0.0, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return OPS.flash_attention_fwd(q, k, v, None, None, q.shape[1], k.shape[1], scale, causal, wl, wr, softcap)


def bwd(do, q, k, v, o, lse, *, causal=False, wl=-1, wr=-1, softcap=0.0, deterministic=False):
    scale = 1.0 / math.sqrt(q.shape[-1])
    return OPS.flash_attention_bwd(do, q, k, v, o, lse, None, None, q.shape[1], k.shape[1], scale, causal, wl, wr,
                                   softcap, deterministic)


def err(a, b, rows=None):
    d = (a.double() - b.double()).abs()
    return d.max().item() if d.numel() else 0.0


def check(name, got, ref64, lowp, atol_rel=None):
    """Max error <= 2x torch's + a floor of half an ulp of the largest reference value (the
    kernel rounds P and dS to the input dtype before the tensor-core products, as FA2 does)."""
    assert not torch.isnan(got).any(), f"{name}: NaN"
    if atol_rel is None:
        atol_rel = torch.finfo(got.dtype).eps / 2
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    e, bar = err(got, ref64), 2 * err(lowp, ref64) + atol_rel * scale + 1e-5
    assert e <= bar, f"{name}: max error {e:.3g} > 2 x torch's {err(lowp, ref64):.3g} + floor"


def make(b, sq, sk, h, hk, d, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, sq, h, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype, generator=g)
    return q, k, v


def run_and_check(b, sq, sk, h, hk, d, dtype, *, causal=False, wl=-1, wr=-1, softcap=0.0, backward=True,
                  deterministic=False):
    q, k, v = make(b, sq, sk, h, hk, d, dtype)
    kw = dict(causal=causal, wl=wl, wr=wr, softcap=softcap)
    out, lse = fwd(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    # float64 reference with autograd, and the low-precision baseline
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = ref_attention(q64, k64, v64, **kw)
    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    low, _ = ref_attention(ql, kl, vl, **kw, upcast=False)
    check("out", out, ref, low)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), "lse must be -inf exactly on rows with no visible key"
    assert (out.transpose(1, 2)[empty] == 0).all(), "rows with no visible key must be 0"
    if (~empty).any():
        assert err(lse[~empty], ref_lse[~empty]) <= 1e-3 * (1 + ref_lse[~empty].abs().max().item())
    if not backward:
        return
    do = torch.randn_like(out)
    dq, dk, dv = bwd(do, q, k, v, out, lse, deterministic=deterministic, **kw)
    g64 = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    gl = torch.autograd.grad(low, (ql, kl, vl), do)
    for name, got, r, lo in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gl):
        assert got.shape == r.shape and got.dtype == dtype
        check(name, got, r, lo.nan_to_num(0.0))


@pytest.mark.parametrize("d", [64, 96, 128, 256, 40, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_dims(d, dtype):
    run_and_check(2, 255, 255, 4, 2, d, dtype)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 300), (17, 17), (255, 1000), (1000, 1000), (1000, 255)])
@pytest.mark.parametrize("causal", [False, True])
def test_seqlens_causal(sq, sk, causal):
    run_and_check(1, sq, sk, 4, 4, 128, torch.bfloat16, causal=causal)


@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_gqa(ratio):
    run_and_check(2, 200, 333, 8, 8 // ratio, 64, torch.float16, causal=True)


@pytest.mark.parametrize("wl,wr", [(32, 0), (100, 17), (-1, 5), (0, 0), (7, -1)])
def test_window(wl, wr):
    run_and_check(1, 300, 420, 2, 1, 128, torch.bfloat16, wl=wl, wr=wr)


@pytest.mark.parametrize("d", [64, 128])
def test_softcap(d):
    run_and_check(1, 257, 257, 4, 2, d, torch.bfloat16, softcap=20.0, causal=True)
    run_and_check(1, 100, 190, 2, 2, d, torch.float16, softcap=3.0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_batch_beyond_the_grid_z_limit(deterministic):
    """65537 batches: the launch grid's z holds 65535, so the kernels run in batch slices (batch_offset)."""
    run_and_check(65537, 3, 5, 1, 1, 64, torch.bfloat16, causal=True, deterministic=deterministic)


def test_long_4096():
    run_and_check(1, 4096, 4096, 2, 1, 128, torch.bfloat16, causal=True)


def test_deterministic_bitwise():
    q, k, v = make(2, 777, 777, 8, 2, 128, torch.bfloat16, seed=3)
    out, lse = fwd(q, k, v, causal=True)
    do = torch.randn_like(out)
    first = bwd(do, q, k, v, out, lse, causal=True, deterministic=True)
    for _ in range(3):
        again = bwd(do, q, k, v, out, lse, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "deterministic backward is not bitwise repeatable"
    atomic = bwd(do, q, k, v, out, lse, causal=True, deterministic=False)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    run_and_check(1, 300, 300, 4, 1, 96, torch.float16, deterministic=True, causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen(causal, dtype):
    lens_q = [17, 0, 255, 1, 100]
    lens_k = [17, 5, 300, 64, 100]
    h, hk, d = 4, 2, 128
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(sum(lens_q), h, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(sum(lens_k), hk, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(sum(lens_k), hk, d, device=DEV, dtype=dtype, generator=g)
    scale = 1.0 / math.sqrt(d)
    out, lse = OPS.flash_attention_fwd(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), scale, causal, -1, -1, 0.0)
    assert lse.shape == (h, sum(lens_q))
    do = torch.randn_like(out)
    dq, dk, dv = OPS.flash_attention_bwd(do, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), scale, causal,
                                         -1, -1, 0.0, False)
    for bi in range(len(lens_q)):
        qs, qe, ks, ke = cu_q[bi].item(), cu_q[bi + 1].item(), cu_k[bi].item(), cu_k[bi + 1].item()
        if qe == qs:
            continue
        qb, kb, vb = q[None, qs:qe], k[None, ks:ke], v[None, ks:ke]
        q64, k64, v64 = (x.double().requires_grad_() for x in (qb, kb, vb))
        ref, ref_lse = ref_attention(q64, k64, v64, causal=causal)
        ql, kl, vl = (x.detach().clone().requires_grad_() for x in (qb, kb, vb))
        low, _ = ref_attention(ql, kl, vl, causal=causal, upcast=False)
        check(f"out[{bi}]", out[None, qs:qe], ref, low)
        fin = ~torch.isinf(ref_lse[0])
        assert err(lse[:, qs:qe][fin], ref_lse[0][fin]) <= 1e-2
        dob = do[None, qs:qe]
        g64 = torch.autograd.grad(ref, (q64, k64, v64), dob.double())
        gl = torch.autograd.grad(low, (ql, kl, vl), dob)
        check(f"dq[{bi}]", dq[None, qs:qe], g64[0], gl[0])
        # dk/dv of this sequence: kv rows are disjoint per sequence
        check(f"dk[{bi}]", dk[None, ks:ke], g64[1], gl[1])
        check(f"dv[{bi}]", dv[None, ks:ke], g64[2], gl[2])
    # keys of the zero-length query sequence get zero gradients
    assert (dk[cu_k[1]:cu_k[2]] == 0).all() and (dv[cu_k[1]:cu_k[2]] == 0).all()


def test_strided_inputs():
    # q/k/v as views into a packed qkv tensor (non-contiguous heads), and an odd-offset view
    qkv = torch.randn(2, 130, 3, 4, 64, device=DEV, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    out, lse = fwd(q, k, v, causal=True)
    ref, _ = ref_attention(q, k, v, causal=True)
    low, _ = ref_attention(q, k, v, causal=True, upcast=False)
    check("out", out, ref, low)
    base = torch.randn(2 * 100 * 4 * 64 + 3, device=DEV, dtype=torch.float16)
    q2 = base[3:].view(2, 100, 4, 64)  # 6-byte misaligned base: the glue copies
    out2, _ = fwd(q2, q2, q2)
    ref2, _ = ref_attention(q2, q2, q2)
    low2, _ = ref_attention(q2, q2, q2, upcast=False)
    check("out (misaligned)", out2, ref2, low2)


def test_bad_inputs():
    q, k, v = make(1, 16, 16, 2, 2, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="BFloat16 or Half"):
        fwd(q.float(), k.float(), v.float())
    qq, kk, vv = make(1, 16, 16, 2, 2, 36, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8"):
        fwd(qq, kk, vv)
    qq, kk, vv = make(1, 16, 16, 2, 2, 264, torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        fwd(qq, kk, vv)
    with pytest.raises(ValueError, match="multiple"):
        fwd(make(1, 16, 16, 3, 2, 64, torch.bfloat16)[0], k, v)


def test_python_api_autograd():
    ops = thrifty.ops
    if not hasattr(ops, "flash_attention"):
        pytest.skip("thrifty.ops.flash_attention not in this tree")
    q, k, v = (x.requires_grad_() for x in make(2, 129, 129, 4, 2, 128, torch.bfloat16))
    out = ops.flash_attention(q, k, v, causal=True)
    out.float().square().sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = ref_attention(q64, k64, v64, causal=True)
    ref.square().sum().backward()
    for got, r in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), r, atol=5e-2 * r.abs().max().item(), rtol=0)
    torch.library.opcheck(OPS.flash_attention_fwd.default,
                          (q.detach(), k.detach(), v.detach(), None, None, 129, 129, 0.125, True, -1, -1, 0.0))
