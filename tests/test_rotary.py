"""Rotary embedding: float64 references (neox and GPT-J, partial rotary, GQA, any leading dims),
Hugging Face's apply_rotary_pos_emb and rope init functions, gradients, strided inputs,
opcheck, compile, bad input."""
from __future__ import annotations

import pytest
import torch

import thrifty
from reference import DTYPES, assert_close_to_ref

# (leading dims, q heads, k heads, head_dim, rotary_dim)
CASES = [
    ((7,), 4, 2, 128, 128),
    ((5,), 3, 1, 80, 80),
    ((3,), 2, 2, 72, 72),
    ((9,), 4, 4, 80, 32),   # partial rotary: features 32..80 copied
    ((4,), 2, 1, 72, 18),   # rotary_dim/2 = 9, not a multiple of any vector width
    ((2, 5), 4, 1, 64, 64),  # (batch, seq, heads, head_dim)
    ((1,), 1, 1, 2, 2),
]
MAX_POS = 300


def rotate_ref(x, cache, pos, interleaved, inverse=False, cast=torch.float64):
    """The rotation in `cast` with the cache's values (float64 reference, or PyTorch's own
    low-precision computation when cast is the input dtype)."""
    rd = cache.shape[1]
    h = rd // 2
    row = cache[pos.long()]
    c = row[..., :h].to(cast).unsqueeze(-2)
    s = row[..., h:].to(cast).unsqueeze(-2)
    if inverse:
        s = -s
    x = x.to(cast)
    if interleaved:
        x1, x2 = x[..., 0:rd:2], x[..., 1:rd:2]
        r = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., :h], x[..., h:rd]
        r = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([r, x[..., rd:]], dim=-1)


def make(lead, hq, hk, d, rd, dtype, device, pos_dtype=torch.int64):
    q = torch.randn(*lead, hq, d, dtype=dtype, device=device)
    k = torch.randn(*lead, hk, d, dtype=dtype, device=device)
    pos = torch.randint(0, MAX_POS, lead, device=device, dtype=pos_dtype)
    cache = thrifty.ops.build_rotary_cache(rd, MAX_POS, base=10000.0, device=device)
    return q, k, pos, cache


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_forward(cpu_isa, case, dtype, interleaved, device):
    q, k, pos, cache = make(*case, dtype, device)
    q0, k0 = q.clone(), k.clone()
    qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache, interleaved)
    assert torch.equal(q, q0) and torch.equal(k, k0), "q and k must be left untouched"
    assert qr.shape == q.shape and kr.shape == k.shape and qr.dtype == dtype and kr.dtype == dtype
    for out, x, name in ((qr, q, "q_rot"), (kr, k, "k_rot")):
        assert_close_to_ref(out, rotate_ref(x, cache, pos, interleaved), rotate_ref(x, cache, pos, interleaved, cast=dtype),
                            atol=1e-6, name=name)
    rd = cache.shape[1]
    assert torch.equal(qr[..., rd:], q[..., rd:]), "features past rotary_dim must be copied exactly"


def test_int32_positions_and_decode(device):
    q, k, pos, cache = make((6,), 4, 2, 64, 64, torch.float32, device)
    a = thrifty.ops.rotary_embedding(q, k, pos, cache)
    b = thrifty.ops.rotary_embedding(q, k, pos.int(), cache)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # one token per sequence at its own position (KV-cache decode)
    qd, kd = q[:, None], k[:, None]
    c = thrifty.ops.rotary_embedding(qd, kd, pos[:, None], cache)
    assert torch.equal(c[0][:, 0], a[0]) and torch.equal(c[1][:, 0], a[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hf_apply_rotary_pos_emb(dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    b, s, hq, hk, d = 2, 11, 4, 2, 64
    cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk, head_dim=d,
                      rope_theta=10000.0, max_position_embeddings=4096)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    pos = torch.randint(0, 4096, (b, s), device=device)
    q = torch.randn(b, s, hq, d, dtype=dtype, device=device)
    k = torch.randn(b, s, hk, d, dtype=dtype, device=device)
    cos, sin = rope(q, pos)  # (b, s, d) in q's dtype
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # HF layout (b, h, s, d)
    cache = thrifty.ops.build_rotary_cache(d, 4096, base=10000.0, device=device)
    qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache)
    ref_q, ref_k = rotate_ref(q, cache, pos, False), rotate_ref(k, cache, pos, False)
    # thrifty and HF both within their own low-precision error of the float64 rotation
    assert_close_to_ref(qr, ref_q, q_hf.transpose(1, 2), factor=1.0, atol=1e-5, name="q_rot")
    assert_close_to_ref(kr, ref_k, k_hf.transpose(1, 2), factor=1.0, atol=1e-5, name="k_rot")
    if dtype == torch.float32:
        # with a cache made of HF's own (float32-angle) cos/sin values the two agree to rounding
        c_all, s_all = rope(q, torch.arange(4096, device=device)[None])
        cache_hf = torch.cat([c_all[0, :, : d // 2], s_all[0, :, : d // 2]], -1).contiguous()
        qh, kh = thrifty.ops.rotary_embedding(q, k, pos, cache_hf)
        torch.testing.assert_close(qh, q_hf.transpose(1, 2), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(kh, k_hf.transpose(1, 2), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", [((7,), 4, 2, 80, 80), ((2, 3), 2, 1, 72, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_backward(cpu_isa, case, dtype, interleaved, device):
    q, k, pos, cache = make(*case, dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache, interleaved)
    ((qr * gq).sum() + (kr * gk).sum()).backward()

    def run_ref(cast):
        qs, ks = q.detach().to(cast).requires_grad_(), k.detach().to(cast).requires_grad_()
        a, b = rotate_ref(qs, cache, pos, interleaved, cast=cast), rotate_ref(ks, cache, pos, interleaved, cast=cast)
        ((a * gq.to(cast)).sum() + (b * gk.to(cast)).sum()).backward()
        return qs.grad, ks.grad

    (rq, rk), (lq, lk) = run_ref(torch.float64), run_ref(dtype)
    assert_close_to_ref(q.grad, rq, lq, atol=1e-6, name="grad_q")
    assert_close_to_ref(k.grad, rk, lk, atol=1e-6, name="grad_k")
    # the backward is the inverse rotation: applying it to the output gives the input back
    bq, bk = torch.ops.thrifty.rotary_embedding_backward(qr.detach().float(), kr.detach().float(), pos, cache,
                                                         interleaved)
    if dtype == torch.float32:
        torch.testing.assert_close(bq, q.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d", [32, 80])  # the plain vector path, and the bf16 pair path with a tail
def test_bf16_denormals_kept_at_position_0(cpu_isa, interleaved, d):
    # At position 0 (cos 1, sin 0) the rotation is exact: bf16 out == bf16 in (up to the sign of
    # zeros), for denormals too. avx512_bf16's VCVTNEPS2BF16 alone would flush them to zero.
    q = (torch.randn(3, 2, d) * 1e-39).to(torch.bfloat16)
    q[0, 0, :4] = torch.tensor([1e-40, -3e-39, 0.0, -0.0]).to(torch.bfloat16)
    assert ((q != 0) & (q.float().abs() < torch.finfo(torch.float32).tiny)).any()
    cache = thrifty.ops.build_rotary_cache(d, 4)
    qr, kr = thrifty.ops.rotary_embedding(q, q, torch.zeros(3, dtype=torch.int64), cache, interleaved)
    assert torch.equal(qr.float(), q.float()) and torch.equal(kr.float(), q.float())


def test_backward_one_output_used():
    q, k, pos, cache = make((5,), 2, 1, 64, 64, torch.float32, "cpu")
    q.requires_grad_()
    k.requires_grad_()
    qr, _ = thrifty.ops.rotary_embedding(q, k, pos, cache)
    qr.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    torch.testing.assert_close(q.grad, rotate_ref(torch.ones_like(q), cache, pos, False, inverse=True).float())


@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_fused_qkv(interleaved, device):
    t, hq, hk, d = 13, 4, 2, 80
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=device)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)  # slices: token stride (hq + 2 hk) d, read in place
    assert not q.is_contiguous()
    pos = torch.randint(0, MAX_POS, (t,), device=device)
    cache = thrifty.ops.build_rotary_cache(64, MAX_POS, device=device)
    qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache, interleaved)
    torch.testing.assert_close(qr, rotate_ref(q, cache, pos, interleaved).float())
    torch.testing.assert_close(kr, rotate_ref(k, cache, pos, interleaved).float())
    # batched slices (b, s, 3, h, d) and leading dims that do not collapse (copied, still right)
    x = torch.randn(2, 7, 3, hq, d, device=device)
    q5, k5 = x[:, :, 0], x[:, :, 1]
    pos2 = torch.randint(0, MAX_POS, (2, 7), device=device)
    qr, kr = thrifty.ops.rotary_embedding(q5, k5, pos2, cache, interleaved)
    torch.testing.assert_close(qr, rotate_ref(q5, cache, pos2, interleaved).float())
    qt, kt = q5.transpose(0, 1), k5.transpose(0, 1)
    qr, kr = thrifty.ops.rotary_embedding(qt, kt, pos2.t(), cache, interleaved)
    torch.testing.assert_close(kr, rotate_ref(kt, cache, pos2.t(), interleaved).float())


def test_empty():
    q, k, pos, cache = make((0,), 2, 1, 64, 64, torch.float32, "cpu")
    qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache)
    assert qr.shape == (0, 2, 64) and kr.shape == (0, 1, 64)


# ---- the cache ----
def _hf_inv_freq(rope_type, d, base, scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d, rope_theta=base, rope_scaling=scaling,
                      max_position_embeddings=131072)
    if rope_type == "default":
        return LlamaRotaryEmbedding(cfg).inv_freq
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")[0]


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope_type,d,base,scaling", [
    ("default", 128, 10000.0, None),
    ("default", 80, 1000000.0, None),
    ("linear", 64, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    ("llama3", 128, 500000.0, LLAMA3),
    ("llama3", 64, 500000.0, {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 4096}),
])
def test_cache_matches_transformers(rope_type, d, base, scaling):
    inv = _hf_inv_freq(rope_type, d, base, scaling)
    mine = thrifty.ops.rotary.rotary_inv_freq(d, base, scaling)
    assert torch.equal(mine, inv), "inv_freq must be exactly transformers'"
    cache = thrifty.ops.build_rotary_cache(d, 5000, base=base, scaling=scaling)
    assert cache.shape == (5000, d) and cache.dtype == torch.float32
    ang = torch.arange(5000, dtype=torch.float64)[:, None] * inv.double()[None]
    torch.testing.assert_close(cache, torch.cat([ang.cos(), ang.sin()], -1).float(), atol=1e-6, rtol=0)
    # transformers' own cos/sin (float32 angles) agree to float32 angle rounding
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=2 * d, num_attention_heads=2, head_dim=d, rope_theta=base, rope_scaling=scaling,
                      max_position_embeddings=131072)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), torch.arange(5000)[None])
    torch.testing.assert_close(cache[:, : d // 2], cos[0, :, : d // 2], atol=2e-3, rtol=0)
    torch.testing.assert_close(cache[:, d // 2:], sin[0, :, : d // 2], atol=2e-3, rtol=0)


def test_linear_scaling_is_positions_over_factor():
    a = thrifty.ops.build_rotary_cache(64, 1600, scaling={"type": "linear", "factor": 4.0})
    b = thrifty.ops.build_rotary_cache(64, 400)
    torch.testing.assert_close(a[1200], b[300], atol=1e-5, rtol=0)


def test_cache_bad_input():
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        thrifty.ops.build_rotary_cache(64, 10, scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="needs the key 'low_freq_factor'"):
        thrifty.ops.build_rotary_cache(64, 10, scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="'rotary_dim' must be a positive even int"):
        thrifty.ops.build_rotary_cache(63, 10)
    with pytest.raises(ValueError, match="'max_position' must be a positive int"):
        thrifty.ops.build_rotary_cache(64, 0)


# ---- opcheck, compile ----
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    q, k, pos, cache = make((2, 3), 4, 2, 80, 64, dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    for inter in (False, True):
        torch.library.opcheck(torch.ops.thrifty.rotary_embedding, (q, k, pos, cache, inter))
        torch.library.opcheck(torch.ops.thrifty.rotary_embedding_backward,
                              (torch.randn_like(q), torch.randn_like(k), pos, cache, inter))


def test_torch_compile_fullgraph():
    cache = thrifty.ops.build_rotary_cache(64, MAX_POS)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, pos):
        qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache)
        return (qr * 2).sum() + kr.square().sum()

    q = torch.randn(5, 4, 64, requires_grad=True)
    k = torch.randn(5, 2, 64, requires_grad=True)
    pos = torch.randint(0, MAX_POS, (5,))
    out = f(q, k, pos)
    out.backward()
    qr, kr = thrifty.ops.rotary_embedding(q, k, pos, cache)
    torch.testing.assert_close(out, (qr * 2).sum() + kr.square().sum())
    torch.testing.assert_close(q.grad, rotate_ref(torch.full_like(q, 2.0), cache, pos, False, inverse=True).float())


# ---- bad input ----
def _args(**over):
    a = dict(q=torch.randn(4, 2, 64), k=torch.randn(4, 1, 64), positions=torch.arange(4),
             cos_sin_cache=thrifty.ops.build_rotary_cache(64, 16))
    a.update(over)
    return a


def _call(**over):
    a = _args(**over)
    return lambda: thrifty.ops.rotary_embedding(a["q"], a["k"], a["positions"], a["cos_sin_cache"])


BAD = [
    (_call(q=torch.randn(4, 2, 64, dtype=torch.float64)), TypeError, "'q' must have dtype"),
    (_call(k=torch.randn(4, 1, 64, dtype=torch.bfloat16)), TypeError, "'k' must have the same dtype as 'q'"),
    (_call(k=torch.randn(4, 1, 32)), ValueError, "'k' must have the head_dim of 'q'"),
    (_call(k=torch.randn(5, 1, 64)), ValueError, "'k' must have the leading"),
    (_call(k=torch.randn(1, 4, 1, 64)), ValueError, "'k' must have 3 dimensions"),
    (_call(q=torch.randn(4, 64), k=torch.randn(4, 64)), ValueError, "'q' must be \\(tokens, heads, head_dim\\)"),
    (_call(positions=torch.arange(5)), ValueError, "'positions' must have shape \\[4\\]"),
    (_call(positions=torch.arange(4)[None]), ValueError, "'positions' must have shape"),
    (_call(positions=torch.arange(4.0)), TypeError, "'positions' must have dtype Long or Int"),
    (_call(positions=torch.tensor([0, 1, 16, 2])), ValueError, "'positions' must lie in \\[0, 16\\).*from 0 to 16"),
    (_call(positions=torch.tensor([0, -1, 3, 2], dtype=torch.int32)), ValueError, "'positions' must lie in \\[0, 16\\)"),
    (_call(cos_sin_cache=thrifty.ops.build_rotary_cache(64, 16).double()), TypeError, "'cos_sin_cache' must have dtype Float"),
    (_call(cos_sin_cache=thrifty.ops.build_rotary_cache(64, 16).bfloat16()), TypeError, "'cos_sin_cache' must have dtype Float"),
    (_call(cos_sin_cache=torch.randn(16, 63)), ValueError, "rotary_dim even, > 0 and <= head_dim \\(64\\)"),
    (_call(cos_sin_cache=torch.randn(16, 66)), ValueError, "rotary_dim even, > 0 and <= head_dim"),
    (_call(cos_sin_cache=torch.randn(16 * 64)), ValueError, "'cos_sin_cache' must be 2-D"),
    (_call(cos_sin_cache=torch.randn(16, 64, requires_grad=True)), ValueError, "'cos_sin_cache' must not require grad"),
    (lambda: torch.ops.thrifty.rotary_embedding_backward(torch.randn(4, 2, 64), torch.randn(4, 1, 60), torch.arange(4),
                                                         torch.randn(16, 64), False), ValueError,
     "'grad_k' must have the head_dim of 'grad_q'"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(i):
    fn, exc, msg = BAD[i]
    with pytest.raises(exc, match=msg):
        fn()


@pytest.mark.cuda
def test_device_mismatch_and_range_on_cuda():
    a = _args()
    with pytest.raises(RuntimeError, match="'k' must be on the same device"):
        thrifty.ops.rotary_embedding(a["q"].cuda(), a["k"], a["positions"].cuda(), a["cos_sin_cache"].cuda())
    with pytest.raises(ValueError, match="'positions' must lie in"):
        thrifty.ops.rotary_embedding(a["q"].cuda(), a["k"].cuda(), torch.tensor([0, 1, 99, 2], device="cuda"),
                                     a["cos_sin_cache"].cuda())


@pytest.mark.cuda
def test_positions_checked_once_per_tensor_on_cuda():
    """The range check syncs with the device once per positions tensor (a model passes the same one to
    every layer); an in-place write to it, or a new tensor, is checked again."""
    a = _args()
    q, k, cache = a["q"].cuda(), a["k"].cuda(), a["cos_sin_cache"].cuda()
    pos = torch.tensor([0, 1, 2, 3], device="cuda")
    ref = thrifty.ops.rotary_embedding(q, k, pos, cache)  # checked (one sync), remembered
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = thrifty.ops.rotary_embedding(q, k, pos, cache)  # remembered: no sync
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(x, y) for x, y in zip(ref, again))
    pos[2] = 99  # bumps the version counter
    with pytest.raises(ValueError, match="'positions' must lie in"):
        thrifty.ops.rotary_embedding(q, k, pos, cache)
    with pytest.raises(ValueError, match="'positions' must lie in"):
        thrifty.ops.rotary_embedding(q, k, torch.tensor([0, 1, 2, cache.shape[0]], device="cuda"), cache)
    with torch.inference_mode():  # inference tensors carry no version counter: checked on every call
        ipos = torch.tensor([0, 1, 2, 3], device="cuda")
        assert all(torch.equal(x, y) for x, y in zip(ref, thrifty.ops.rotary_embedding(q, k, ipos, cache)))
        ipos[2] = 99
        with pytest.raises(ValueError, match="'positions' must lie in"):
            thrifty.ops.rotary_embedding(q, k, ipos, cache)


def _copies(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]


def test_fused_qkv_slices_are_not_copied():
    t, hq, hk, d = 9, 4, 2, 64
    qkv = torch.randn(2, t, (hq + 2 * hk) * d)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(2, t, hq, d), k.view(2, t, hk, d)
    pos = torch.randint(0, MAX_POS, (2, t))
    cache = thrifty.ops.build_rotary_cache(d, MAX_POS)
    assert _copies(lambda: torch.ops.thrifty.rotary_embedding(q, k, pos, cache, False)) == []
    # a layout that cannot collapse is copied (and still right, see test_strided_fused_qkv)
    assert _copies(lambda: torch.ops.thrifty.rotary_embedding(q.transpose(0, 1), k.transpose(0, 1), pos.t(), cache,
                                                              False)) != []
