"""An outside tester's audit of the op API of issues 2 (rms_norm, rotary_embedding, swiglu, the
thrifty.nn modules) and 3 (flash_attention, flash_attention_varlen, the SDPA drop-in), written
from the issue text: the gaps the big per-op test files leave (torch's broadcasting rules in the
SDPA drop-in, arguments named in every error, the window formula and "no visible key" rows checked
exhaustively on small shapes, gradients of masked rows, last-dim-strided inputs, the default
inductor backend with dynamic shapes, seqlen 128k). CPU only, fast."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import thrifty

sdpa = thrifty.nn.functional.scaled_dot_product_attention
NEG_INF = float("-inf")


def _ref_attention(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    """float64 softmax(QK^T)V on (b, s, h, d), the issue's visibility formula written out."""
    q, k, v = (t.double() for t in (q, k, v))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = (t.repeat_interleave(h // hk, 2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    wl, wr = window
    if causal:
        wr = 0
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if wl >= 0:
        vis &= i + sk - sq - wl <= j
    if wr >= 0:
        vis &= j <= i + sk - sq + wr
    s = s.masked_fill(~vis, NEG_INF)
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(0.0), v)
    return out, lse


def _grads(fn, inputs, g):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    return out, torch.autograd.grad(out, xs, g.to(out.dtype))


# ---------------- SDPA drop-in: torch's broadcasting rules ----------------
# torch.nn.functional.scaled_dot_product_attention broadcasts every dim but the last two, across ranks and
# over the head dim too; the drop-in used to refuse these calls (rank mismatch, one query head, k/v heads 1 vs n).
@pytest.mark.parametrize("qs,ks,vs", [
    ((4, 5, 16), (2, 4, 7, 16), (2, 4, 7, 16)),        # 3-D query against 4-D key/value
    ((2, 4, 5, 16), (4, 7, 16), (4, 7, 16)),           # 4-D query against 3-D key/value
    ((2, 4, 5, 16), (7, 16), (7, 16)),                 # ... against 2-D key/value
    ((5, 16), (2, 3, 7, 16), (3, 7, 16)),              # three ranks
    ((2, 1, 5, 16), (2, 4, 7, 16), (2, 4, 7, 16)),     # one query head, four kv heads
    ((2, 4, 5, 16), (2, 1, 7, 16), (2, 4, 7, 16)),     # key heads 1, value heads 4
    ((2, 4, 5, 16), (2, 4, 7, 16), (1, 1, 7, 24)),     # value broadcast in batch and heads, Ev != E
])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_broadcasts_like_torch(qs, ks, vs, is_causal):
    q, k, v = (torch.randn(*s) for s in (qs, ks, vs))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal)
    g = torch.randn(ref.shape)
    out, grads = _grads(lambda a, b, c: sdpa(a, b, c, is_causal=is_causal), (q, k, v), g)
    _, ref_grads = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=is_causal),
                          (q.double(), k.double(), v.double()), g)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


def test_sdpa_head_rules_match_torch_with_enable_gqa():
    # with enable_gqa torch requires query heads to be a multiple of kv heads: one query head against four
    # is refused there, and here with a message naming both counts
    q, k = torch.randn(1, 1, 5, 16), torch.randn(1, 4, 5, 16)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match=r"query heads \(1\) must be a multiple of key/value heads \(4\)"):
        sdpa(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="same heads"):  # 2 vs 4 heads of key and value: no broadcast
        sdpa(torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 4, 5, 16), enable_gqa=True)


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_sdpa_non_tensor_argument_is_named(name):
    args = dict(query=torch.randn(1, 2, 4, 16), key=torch.randn(1, 2, 4, 16), value=torch.randn(1, 2, 4, 16))
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=f"argument '{name}' must be a tensor, got list"):
        sdpa(**args)


@pytest.mark.parametrize("E,Ev", [(300, 300), (64, 300), (272, 16)])
def test_sdpa_embedding_over_the_limit_names_E_and_Ev(E, Ev):
    # E = 64 with Ev = 300 used to report "head_dim ... (got 300)": neither the user's E nor which tensor
    q, k, v = torch.randn(1, 2, 3, E), torch.randn(1, 2, 3, E), torch.randn(1, 2, 3, Ev)
    with pytest.raises(ValueError, match=rf"E of query/key \({E}\) and Ev of value \({Ev}\) must be <= 256"):
        sdpa(q, k, v)


def test_sdpa_low_precision_error_within_twice_torch():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 8, 33, 80), torch.randn(2, 2, 47, 80), torch.randn(2, 2, 47, 80)
    for dtype in (torch.bfloat16, torch.float16):
        a, b, c = (t.to(dtype) for t in (q, k, v))
        for causal in (False, True):
            ref = F.scaled_dot_product_attention(a.double(), b.double(), c.double(), is_causal=causal,
                                                 enable_gqa=True)
            got = sdpa(a, b, c, is_causal=causal, enable_gqa=True)
            low = F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=True)
            assert got.dtype == dtype
            err, err_torch = ((x.double() - ref).abs().max().item() for x in (got, low))
            assert err <= 2 * err_torch + 1e-6, (dtype, causal, err, err_torch)


# ---------------- flash_attention: every bad input named ----------------
def test_flash_attention_0d_q_is_refused_by_name():
    k = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="argument 'q' must be 4-D"):  # was an IndexError from the wrapper
        thrifty.ops.flash_attention(torch.tensor(1.0), k, k)
    with pytest.raises(ValueError, match="argument 'q' must be 3-D"):
        thrifty.ops.flash_attention_varlen(torch.tensor(1.0), k[0], k[0], cu, cu, 4, 4)


@pytest.mark.parametrize("d", [0, 257])
def test_head_dim_limit_names_q(d):
    q, k = torch.randn(1, 4, 2, d), torch.randn(1, 4, 2, d)
    with pytest.raises(ValueError, match=rf"head_dim must be in \[1, 256\] on cpu \(got {d}, the last dim of "
                                         rf"argument 'q' of shape \[1, 4, 2, {d}\]\)"):
        thrifty.ops.flash_attention(q, k, k)


@pytest.mark.parametrize("bad", [2.5, 4.0, True, torch.tensor(4.0)])
def test_varlen_max_seqlen_must_be_an_int(bad):
    # 2.5 used to be truncated to 2 without a word
    q, k = torch.randn(8, 2, 16), torch.randn(8, 1, 16)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(TypeError, match="argument 'max_seqlen_q' must be an int"):
        thrifty.ops.flash_attention_varlen(q, k, k, cu, cu, bad, 4)
    with pytest.raises(TypeError, match="argument 'max_seqlen_k' must be an int"):
        thrifty.ops.flash_attention_varlen(q, k, k, cu, cu, 4, bad)
    import numpy as np

    for ok in (4, np.int64(4), torch.tensor(4)):  # integral scalars keep working
        thrifty.ops.flash_attention_varlen(q, k, k, cu, cu, ok, ok)


# ---------------- flash_attention: the semantics the issue states ----------------
def test_window_formula_and_empty_rows_exhaustively():
    """Every (left, right) in {-1, 0, 1, 3} x {-1, 0, 2} with causal off and on, seqlen_q <, =, > seqlen_k:
    i + sk - sq - left <= j <= i + sk - sq + right; a row with no visible key: out 0 and lse -inf exactly."""
    torch.manual_seed(0)
    for sq, sk in ((3, 7), (5, 5), (7, 3), (1, 4), (4, 1)):
        q, k, v = torch.randn(1, sq, 2, 8), torch.randn(1, sk, 1, 8), torch.randn(1, sk, 1, 8)
        for causal in (False, True):
            for wl in (-1, 0, 1, 3):
                for wr in (-1, 0, 2):
                    out, lse = thrifty.ops.flash_attention(q, k, v, causal=causal, window=(wl, wr), return_lse=True)
                    ref, ref_lse = _ref_attention(q, k, v, causal, (wl, wr))
                    empty = torch.isinf(ref_lse)
                    ctx = (sq, sk, causal, wl, wr)
                    assert torch.equal(torch.isinf(lse), empty), ctx
                    assert (lse[empty] == NEG_INF).all() and (out.transpose(1, 2)[empty] == 0).all(), ctx
                    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=str(ctx))
                    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=1e-5, rtol=1e-5)


def test_causal_overrides_a_right_window():
    q, k, v = torch.randn(1, 6, 2, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    for wl in (-1, 2):
        torch.testing.assert_close(thrifty.ops.flash_attention(q, k, v, causal=True, window=(wl, 3)),
                                   thrifty.ops.flash_attention(q, k, v, window=(wl, 0)), rtol=0, atol=0)


def test_gradients_of_masked_rows_and_unused_keys_are_zero():
    """Rows that see no key get dq = 0 (not NaN); keys no query sees get dk = dv = 0; in varlen the rows past
    cu_seqlens[-1] and the keys past the last sequence too. The rest against float64."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, 4, 16), torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    g = torch.randn(1, 6, 4, 16)
    out, (dq, dk, dv) = _grads(lambda a, b, c: thrifty.ops.flash_attention(a, b, c, causal=True), (q, k, v), g)
    _, (rq, rk, rv) = _grads(lambda a, b, c: _ref_attention(a, b, c, True)[0], (q.double(), k.double(), v.double()),
                             g)
    assert (dq[:, :3] == 0).all() and torch.isfinite(dq).all()  # rows 0-2 see nothing (bottom-right causal)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)
    # window (0, 0) with seqlen_q 2 < seqlen_k 5: keys 0-2 are seen by no query
    q2, k2 = torch.randn(1, 2, 2, 16), torch.randn(1, 5, 2, 16)
    _, (_, dk2, dv2) = _grads(lambda a, b, c: thrifty.ops.flash_attention(a, b, c, window=(0, 0)), (q2, k2, k2),
                              torch.randn(1, 2, 2, 16))
    assert (dk2[:, :3] == 0).all() and (dv2[:, :3] == 0).all() and (dv2[:, 3:] != 0).any()
    # varlen: sequence 1 has queries but no keys, rows 5-6 of q and rows 5-8 of k belong to no sequence
    qv, kv, vv = torch.randn(7, 2, 16), torch.randn(9, 1, 16), torch.randn(9, 1, 16)
    cq, ck = torch.tensor([0, 2, 4, 5], dtype=torch.int32), torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    out, (dq, dk, dv) = _grads(lambda a, b, c: thrifty.ops.flash_attention_varlen(a, b, c, cq, ck, 2, 3), (qv, kv, vv),
                               torch.randn(7, 2, 16))
    assert (out[2:4] == 0).all() and (out[5:] == 0).all()
    assert (dq[2:4] == 0).all() and (dq[5:] == 0).all() and (dk[5:] == 0).all() and (dv[5:] == 0).all()
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_seqlen_128k_windowed_forward_and_backward():
    """The issue's seqlen range tops at 128k: a sliding window keeps it cheap; checked against float64 on
    rows at the start, the middle and the end (int32 row offsets would break far before this)."""
    s, w = 131072, 15
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, s, 1, 32, requires_grad=True) for _ in range(3))
    out, lse = thrifty.ops.flash_attention(q, k, v, causal=True, window=(w, 0), return_lse=True)
    g = torch.randn_like(out)
    out.backward(g)
    for i0 in (0, 70001, s - 24):
        lo = max(0, i0 - w)
        qs, ks, vs = (t.detach()[:, a:b] for t, a, b in ((q, i0, i0 + 24), (k, lo, i0 + 24), (v, lo, i0 + 24)))
        # the slice [lo, i0 + 24) of keys holds every key rows i0.. see; bottom-right = the global diagonal
        ref, ref_lse = _ref_attention(qs, ks, vs, True, (w, 0))
        torch.testing.assert_close(out[:, i0:i0 + 24].double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, :, i0:i0 + 24].double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # dv of the last key: only the last query sees it, with weight p = exp(s - lse)
    p = torch.exp((q[0, -1, 0] @ k[0, -1, 0]).double() / math.sqrt(32) - lse[0, 0, -1].double())
    torch.testing.assert_close(v.grad[0, -1, 0].double(), p * g[0, -1, 0].double(), atol=1e-5, rtol=1e-4)


# ---------------- inputs whose last dim is strided (issue 2: right answer or a clear error) ----------------
def test_last_dim_strided_inputs_give_the_contiguous_answer_and_gradients():
    torch.manual_seed(4)
    wide = torch.randn(3, 9, 4, 2 * 40)
    q = wide[..., ::2]  # stride 2 in the last dim
    k, v = torch.randn(3, 11, 2, 40), torch.randn(3, 11, 2, 40)
    g = torch.randn(3, 9, 4, 40)
    for fn in (lambda a, b, c: thrifty.ops.flash_attention(a, b, c, causal=True, softcap=5.0),):
        o1, g1 = _grads(fn, (q, k, v), g)
        o2, g2 = _grads(fn, (q.contiguous(), k, v), g)
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(5, 2 * 769)[:, ::2]
    w = torch.randn(769)
    torch.testing.assert_close(thrifty.ops.rms_norm(x, w), thrifty.ops.rms_norm(x.contiguous(), w), rtol=0, atol=0)
    gy = torch.randn(5, 769)
    for a, b in zip(_grads(thrifty.ops.rms_norm, (x, w), gy)[1],
                    _grads(thrifty.ops.rms_norm, (x.contiguous(), w), gy)[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gate, up = torch.randn(4, 2 * 65)[:, ::2], torch.randn(65, 4).t()
    torch.testing.assert_close(thrifty.ops.swiglu(gate, up), F.silu(gate) * up, atol=1e-6, rtol=1e-6)
    cache = thrifty.ops.build_rotary_cache(32, 16)
    qr, kr = torch.randn(5, 2, 2 * 48)[..., ::2], torch.randn(5, 1, 48)
    pos = torch.tensor([0, 3, 15, 7, 1])
    q0 = qr.clone()
    a = thrifty.ops.rotary_embedding(qr, kr, pos, cache, True)
    b = thrifty.ops.rotary_embedding(qr.contiguous(), kr, pos, cache, True)
    assert torch.equal(qr, q0)  # untouched
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------- torch.compile with the default backend, dynamic shapes ----------------
def test_torch_compile_inductor_dynamic_fullgraph():
    """The per-op files compile with backend="aot_eager"; a user runs torch.compile's default (inductor), often
    with dynamic shapes: every op of issues 2 and 3 in one graph, two sizes, forward and gradients."""
    cache = thrifty.ops.build_rotary_cache(32, 64)

    def f(x, w, r, q, k, v, pos, cu):
        y, h = thrifty.ops.rms_norm(x, w, 1e-6, residual=r)
        s = thrifty.ops.swiglu(y, h)
        qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache)
        o = thrifty.ops.flash_attention(qr[None], kr[None], v[None], causal=True, softcap=5.0)
        o2 = thrifty.ops.flash_attention_varlen(qr, kr, v, cu, cu, 8, 8, window=(2, 1))
        o3 = sdpa(qr[None].transpose(1, 2), kr[None].transpose(1, 2), v[None].transpose(1, 2), is_causal=True,
                  enable_gqa=True)
        return s.sum() + o.sum() + o2.sum() + (o3 * o3).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for t in (12, 13):
        inputs = [torch.randn(t, 48), torch.randn(48), torch.randn(t, 48), torch.randn(t, 4, 32),
                  torch.randn(t, 2, 32), torch.randn(t, 2, 32)]
        diff = [0, 1, 3, 4, 5]
        extra = (torch.arange(t), torch.tensor([0, 5, t], dtype=torch.int32))
        results = []
        for fn in (cf, f):
            xs = [a.clone().requires_grad_(i in diff) for i, a in enumerate(inputs)]
            out = fn(*xs, *extra)
            results.append((out, torch.autograd.grad(out, [xs[i] for i in diff])))
        torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# ---------------- opcheck on the odd cases ----------------
def test_opcheck_odd_cases():
    ops = torch.ops.thrifty
    r = lambda *s, dtype=torch.float32: torch.randn(*s).to(dtype).requires_grad_()  # noqa: E731
    bf = torch.bfloat16
    torch.library.opcheck(ops.rms_norm, (r(2, 3, 769, dtype=bf), r(769), 1e-6))  # float32 weight, bf16 x
    torch.library.opcheck(ops.fused_add_rms_norm, (r(5125, dtype=bf), r(5125, dtype=bf), r(5125), 1e-5))
    torch.library.opcheck(ops.flash_attention_fwd, (r(1, 3, 2, 16), r(1, 0, 2, 16), r(1, 0, 2, 16), None, None, 3, 0,
                                                    0.25, False, -1, -1, 0.0))  # no keys at all
    torch.library.opcheck(ops.flash_attention_fwd, (r(1, 3, 2, 256, dtype=bf), r(1, 5, 1, 256, dtype=bf),
                                                    r(1, 5, 1, 256, dtype=bf), None, None, 3, 5, 0.0625, True, 1, -1,
                                                    2.0))
    torch.library.opcheck(ops.rotary_embedding, (r(2, 3, 4, 48, dtype=bf), r(2, 3, 1, 48, dtype=bf),
                                                 torch.randint(0, 50, (2, 3), dtype=torch.int32),
                                                 thrifty.ops.build_rotary_cache(32, 50), True))


# ---------------- forward-mode AD: a clear error, not a silent zero tangent ----------------
def _fwd_ad_cases():
    g = torch.Generator().manual_seed(0)
    x, u, w = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.ones(8)
    q = torch.randn(1, 5, 2, 16, generator=g)
    lab = torch.randint(0, 6, (3,), generator=g)
    return [("swiglu", lambda a: thrifty.ops.swiglu(a, u), x),
            ("rms_norm", lambda a: thrifty.ops.rms_norm(a, w), x),
            ("flash_attention", lambda a: thrifty.ops.flash_attention(a, a, a), q),
            ("linear_cross_entropy", lambda a: thrifty.ops.linear_cross_entropy(a, torch.randn(6, 8), lab), x),
            ("linear", lambda a: thrifty.ops.linear(a, torch.randn(4, 8)), x)]


@pytest.mark.parametrize("i", range(5))
def test_forward_mode_ad_is_refused_by_name(i):
    """torch.library ops with register_autograd have no forward-mode formula, and torch gave jvp / dual-number
    calls a zero or None tangent without a word (torch.func.jvp of swiglu: all zeros, the true one up to 2.4)."""
    import torch.autograd.forward_ad as fwAD
    name, f, x = _fwd_ad_cases()[i]
    with pytest.raises(NotImplementedError, match=rf"thrifty.{name}: forward-mode AD .* is not supported"):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            f(fwAD.make_dual(x, torch.ones_like(x)))
        f(x)  # no tangent inside a dual level: runs
    f(x)
