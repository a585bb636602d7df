"""Edges every op wrapper shares: a non-tensor where a tensor belongs is named; an empty reduction
dimension (K = 0) gives what torch gives; the inference-only ops refuse to be backpropagated through
instead of leaving .grad silently None; multi_tensor_l2norm is differentiable."""
from __future__ import annotations

import math

import pytest
import torch

import thrifty
from thrifty import ops


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


_W4 = dict(bits=8, group_size=-1)

# (call, the argument the message must name); each call passes a non-tensor in that argument
_NON_TENSOR_CALLS = [
    (lambda: ops.rms_norm(None, _x(8)), "x"),
    (lambda: ops.rms_norm(_x(2, 8), None), "weight"),
    (lambda: ops.rms_norm(_x(2, 8), _x(8), residual=[1.0]), "residual"),
    (lambda: ops.swiglu(_x(2, 8), None), "up"),
    (lambda: ops.swiglu(3.0, _x(2, 8)), "gate"),
    (lambda: ops.linear(_x(2, 8), None), "weight"),
    (lambda: ops.linear(_x(2, 8), _x(3, 8), bias=[0.0, 0.0, 0.0]), "bias"),
    (lambda: ops.flash_attention(_x(1, 4, 2, 8), None, _x(1, 4, 2, 8)), "k"),
    (lambda: ops.flash_attention(1, _x(1, 4, 2, 8), _x(1, 4, 2, 8)), "q"),
    (lambda: ops.flash_attention_varlen(_x(4, 2, 8), _x(4, 2, 8), _x(4, 2, 8), [0, 4], [0, 4], 4, 4), "cu_seqlens_q"),
    (lambda: ops.rotary_embedding(_x(3, 2, 8), _x(3, 2, 8), None, ops.build_rotary_cache(8, 8)), "positions"),
    (lambda: ops.linear_cross_entropy(_x(3, 8), None, torch.zeros(3, dtype=torch.long)), "weight"),
    (lambda: ops.quantize_per_token(None), "x"),
    (lambda: ops.int8_linear(torch.zeros(2, 8, dtype=torch.int8), None, torch.zeros(3, 8, dtype=torch.int8),
                             torch.ones(3)), "x_scales"),
    (lambda: ops.quant_linear(_x(2, 8), None, torch.ones(3), **_W4), "qweight"),
    (lambda: ops.dequantize(torch.zeros(3, 8, dtype=torch.int8), None, **_W4), "scales"),
]


@pytest.mark.parametrize("call,arg", _NON_TENSOR_CALLS, ids=[f"{i}-{a}" for i, (_, a) in enumerate(_NON_TENSOR_CALLS)])
def test_a_non_tensor_argument_is_named(call, arg):
    with pytest.raises(TypeError, match=f"argument '{arg}' must be a tensor, got"):
        call()


def test_multi_tensor_l2norm_names_a_non_tensor_element_and_takes_a_single_tensor():
    with pytest.raises(TypeError, match="element 1 is NoneType"):
        ops.multi_tensor_l2norm([_x(3), None])
    x = _x(4, 5)
    torch.testing.assert_close(ops.multi_tensor_l2norm(x), torch.linalg.vector_norm(x))


# ---- K = 0: an empty reduction is zero, as in torch ----
def test_linear_with_zero_in_features_is_the_bias_and_backpropagates():
    x = torch.zeros(3, 0, requires_grad=True)
    w = torch.zeros(4, 0, requires_grad=True)
    b = _x(4).requires_grad_()
    y = ops.linear(x, w, b)
    torch.testing.assert_close(y, b.detach().expand(3, 4))
    y.sum().backward()
    assert x.grad.shape == (3, 0) and w.grad.shape == (4, 0)
    torch.testing.assert_close(b.grad, torch.full((4,), 3.0))


def test_linear_cross_entropy_with_zero_hidden_is_uniform_over_the_vocab():
    h = torch.zeros(3, 0, requires_grad=True)
    w = torch.zeros(5, 0, requires_grad=True)
    loss = ops.linear_cross_entropy(h, w, torch.tensor([0, 1, 4]))
    torch.testing.assert_close(loss, torch.tensor(math.log(5.0)))
    loss.backward()
    assert h.grad.shape == (3, 0) and w.grad.shape == (5, 0)


def test_int8_ops_with_zero_in_features():
    xq, scales = ops.quantize_per_token(torch.zeros(2, 3, 0))
    assert xq.shape == (2, 3, 0) and xq.dtype == torch.int8
    torch.testing.assert_close(scales, torch.zeros(2, 3, 1))  # an empty row is an all-zero row: scale 0
    b = _x(4)
    y = ops.int8_linear(xq, scales, torch.zeros(4, 0, dtype=torch.int8), torch.ones(4), b)
    torch.testing.assert_close(y, b.expand(2, 3, 4))
    y8 = ops.quant_linear(torch.zeros(2, 0), torch.zeros(4, 0, dtype=torch.int8), torch.ones(4), bias=b, **_W4)
    torch.testing.assert_close(y8, b.expand(2, 4))


# ---- inference-only ops: backward is an error that names the op ----
def test_quantize_per_token_refuses_backward():
    x = _x(3, 16).requires_grad_()
    _, scales = ops.quantize_per_token(x)
    with pytest.raises(RuntimeError, match="thrifty::quantize_per_token is not differentiable"):
        scales.sum().backward()


def test_dequantize_refuses_backward_through_scales():
    scales = torch.rand(4, requires_grad=True)
    w = ops.dequantize(torch.ones(4, 8, dtype=torch.int8), scales, **_W4)
    with pytest.raises(RuntimeError, match="thrifty::quant_dequantize is not differentiable"):
        w.sum().backward()


def test_int8_linear_gives_the_bias_gradient_and_refuses_the_scales():
    xq, xs = ops.quantize_per_token(_x(2, 3, 16))
    wq, ws = torch.randint(-127, 128, (5, 16), dtype=torch.int8), torch.rand(5)
    bias = _x(5).requires_grad_()
    gy = _x(2, 3, 5)
    ops.int8_linear(xq, xs, wq, ws, bias).backward(gy)
    torch.testing.assert_close(bias.grad, gy.sum((0, 1)))
    # a 1-D xq: one row, the gradient is gy itself
    bias.grad = None
    ops.int8_linear(xq[0, 0], xs[0, 0], wq, ws, bias).backward(gy[0, 0])
    torch.testing.assert_close(bias.grad, gy[0, 0])

    ws.requires_grad_()
    with pytest.raises(RuntimeError, match="thrifty::int8_linear is not differentiable"):
        ops.int8_linear(xq, xs, wq, ws, bias).sum().backward()


def test_multi_tensor_l2norm_gradient_matches_torch():
    a = _x(7, 3).requires_grad_()
    b = _x(11, dtype=torch.bfloat16).requires_grad_()
    c = _x(5)  # no grad wanted for this one
    ops.multi_tensor_l2norm([a, b, c]).backward()
    assert b.grad.dtype == torch.bfloat16 and c.grad is None
    a2, b2 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    torch.linalg.vector_norm(torch.cat([a2.flatten(), b2, c.double()])).backward()
    torch.testing.assert_close(a.grad, a2.grad.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, b2.grad.bfloat16())
    # at zero the gradient is zero (not NaN), as torch's
    z = torch.zeros(4, requires_grad=True)
    ops.multi_tensor_l2norm([z]).backward()
    assert torch.equal(z.grad, torch.zeros(4))


def test_multi_tensor_l2norm_opcheck():
    torch.library.opcheck(torch.ops.thrifty.multi_tensor_l2norm.default,
                          ([_x(3, 4).requires_grad_(), _x(5).requires_grad_()],))


# ---- torch.autocast: each fused op has torch's rule for its kind of op ----
def test_ops_under_autocast_follow_torchs_rules():
    """Without autocast rules the fused ops got what the surrounding autocast ops left: a bf16 branch output next
    to a float32 residual (fused_add_rms_norm refused the mix: thrifty.models.Llama and --fsdp bf16 failed)."""
    x32, r32, w = torch.randn(4, 64), torch.randn(4, 64), torch.rand(64) + 0.5
    x16 = x32.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = thrifty.ops.rms_norm(x16, w, 1e-6, residual=r32)  # fused add: promoted as x + residual would be
        assert y.dtype == h.dtype == torch.float32
        # a norm alone keeps its input's dtype, as torch's on the CPU (its autocast leaves norms alone)
        assert thrifty.ops.rms_norm(x16, w).dtype == torch.nn.RMSNorm(64)(x16).dtype == torch.bfloat16
        assert thrifty.nn.RMSNorm(64).bfloat16()(x16).dtype == torch.bfloat16
        assert thrifty.ops.rms_norm(x32, w).dtype == torch.nn.RMSNorm(64)(x32).dtype == torch.float32
        assert thrifty.ops.rms_norm(x16, w.bfloat16(), residual=x16)[1].dtype == torch.bfloat16
        q = torch.randn(1, 9, 2, 64)
        assert thrifty.ops.flash_attention(q, q, q, causal=True).dtype == torch.bfloat16  # as SDPA: lower
        assert thrifty.ops.linear(x32, torch.randn(8, 64)).dtype == torch.bfloat16       # as linear: lower
        assert thrifty.ops.swiglu(x16, x32).dtype == torch.float32                        # elementwise: promote
        assert thrifty.ops.swiglu(x16, x16).dtype == torch.bfloat16
    h_ref = x16.float() + r32
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-6) * w)


def test_llama_trains_under_autocast_and_compile():
    from thrifty.models import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    m = Llama(cfg).init_weights()
    ids = torch.randint(0, 300, (2, 16))
    ref = m(ids, labels=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids, labels=ids)
        assert m(ids).dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 2e-2
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compiled(ids, labels=ids), loss.detach())


def test_quantized_linears_under_autocast_compute_in_its_dtype_as_nn_linear():
    from thrifty.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(3, 64)
    for kw in (dict(bits=4, group_size=32), dict(bits=8), dict(bits=8, act_bits=8)):
        q = QuantLinear.from_float(lin, **kw)
        want = q(x.bfloat16())  # outside autocast, on bf16 input
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = q(x)
            assert got.dtype == lin(x).dtype == torch.bfloat16, kw
            with torch.autocast("cpu", enabled=False):
                assert q(x).dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op itself, scales and zeros left float32
        q4 = QuantLinear.from_float(lin, bits=4, group_size=32)
        y = thrifty.ops.quant_linear(x, q4.qweight, q4.scales, q4.zeros, bits=4, group_size=32, bias=q4.bias)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_with_an_infinite_logit_is_finite_where_torchs_is(dtype):
    """loss = (1 - eps) (lse - z_y) + eps (lse - mean z): with eps = 0 an infinite logit elsewhere in the row made
    the second term 0 * inf = NaN."""
    import torch.nn.functional as F

    h = torch.randn(4, 16).abs().to(dtype)
    w = torch.randn(10, 16).to(dtype)
    w[7, 0] = -float("inf")
    y = torch.tensor([1, 2, 3, 4])
    ref = F.cross_entropy(F.linear(h.double(), w.double()), y, reduction="none")
    got = thrifty.ops.linear_cross_entropy(h, w, y, reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)
    # label smoothing averages every logit: -inf in the row makes torch's loss inf too
    assert torch.isinf(thrifty.ops.linear_cross_entropy(h, w, y, label_smoothing=0.1))
    assert torch.isinf(F.cross_entropy(F.linear(h.float(), w.float()), y, label_smoothing=0.1))


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32), dict(bits=8), dict(bits=8, act_bits=8)])
def test_frozen_quantized_backward_dequantizes_a_block_of_rows_at_a_time(monkeypatch, kw):
    """grad_x of a frozen QuantLinear (QLoRA's base) against float64, with the weight dequantized in 7-row blocks
    (the last one ragged) and never whole: a float32 copy of the weight per backward was the step's peak."""
    import thrifty.ops.quant as Q
    from thrifty.nn import QuantLinear

    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.nn.Linear(96, 200), **kw)
    seen = []

    class _Ops:
        def __getattr__(self, name):
            return getattr(torch.ops.thrifty, name)

        @staticmethod
        def quant_dequantize(qweight, *args):
            seen.append(qweight.shape[0])
            return torch.ops.thrifty.quant_dequantize(qweight, *args)

    monkeypatch.setattr(Q, "_ops", _Ops())
    monkeypatch.setattr(Q, "_DEQUANT_BLOCK_BYTES", 4 * 96 * 7)
    x = torch.randn(2, 3, 96, requires_grad=True)
    g = torch.randn(2, 3, 200)
    q(x).backward(g)
    assert max(seen) == 7 and sum(seen) == 200
    torch.testing.assert_close(x.grad.double(), g.double() @ q.dequantize().double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_logits_backward_over_several_vocab_blocks(dtype):
    """The keep-logits path's backward copies its logits a vocab block at a time (it cloned them whole: ~4x the
    logits at its peak); 64 tokens x 40000 vocab is kept and spans three blocks."""
    import torch.nn.functional as F

    from thrifty.ops.loss import _keep_logits

    torch.manual_seed(0)
    h = (torch.randn(64, 32) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(40000, 32) * 0.1).to(dtype).requires_grad_()
    y = torch.randint(0, 40000, (64,))
    y[::7] = -100
    if dtype == torch.bfloat16 and not thrifty.ops.loss._cpu_multiplies_bf16():
        pytest.skip("bf16 logits are kept only where the CPU multiplies bf16 natively")
    assert _keep_logits(h, w, 0)
    loss = thrifty.ops.linear_cross_entropy(h, w, y, label_smoothing=0.1)
    loss.backward()
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.T, y, label_smoothing=0.1)
    ref.backward()
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(h.grad.double(), hd.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wd.grad, **tol)


def test_float16_loss_on_the_cpu_multiplies_float32_copies():
    """torch's float16 CPU GEMM ran ~45x slower than bf16 (142 s against 3 s for 4096 x 32000 x 512): float16
    takes the float32 copies, so no float16 logits are kept either."""
    from thrifty.ops.loss import _keep_logits

    h = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
    assert not _keep_logits(h, torch.randn(10, 8, dtype=torch.float16), 0)
    import torch.nn.functional as F

    w, y = torch.randn(10, 8, dtype=torch.float16), torch.tensor([1, 2, -100, 9])
    loss = thrifty.ops.linear_cross_entropy(h, w, y)
    loss.backward()
    hd = h.detach().double().requires_grad_()
    ref = F.cross_entropy(hd @ w.double().T, y)
    ref.backward()
    assert loss.dtype == h.grad.dtype == torch.float16
    torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=2e-3, atol=2e-3)


def test_adamw8bit_quantizes_a_loaded_float_state():
    """Swapped into a running torch.optim.AdamW loop through load_state_dict, AdamW8bit kept float32 moments
    for good (no 8-bit saving, no word). Now the tensors that take 8-bit state are quantized at load."""
    from thrifty.ops.optim import create_dynamic_map, dequantize_blockwise
    from thrifty.optim import AdamW8bit

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256)  # weight 65536 elements: 8-bit; bias 256: float32
    ref = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    for _ in range(3):
        lin(torch.randn(8, 256)).square().mean().backward()
        ref.step()
        ref.zero_grad()
    torch_state = {k: v.clone() for k, v in ref.state[lin.weight].items()}
    opt = AdamW8bit(lin.parameters(), lr=1e-3)
    opt.load_state_dict(ref.state_dict())
    w, b = opt.state[lin.weight], opt.state[lin.bias]
    assert w["exp_avg"].dtype == w["exp_avg_sq"].dtype == torch.uint8 and b["exp_avg"].dtype == torch.float32
    m = dequantize_blockwise(w["exp_avg"], w["absmax_m"], create_dynamic_map(True))
    v = dequantize_blockwise(w["exp_avg_sq"], w["absmax_v"], create_dynamic_map(False))
    torch.testing.assert_close(m, torch_state["exp_avg"], rtol=0.1, atol=2e-2 * float(torch_state["exp_avg"].abs().max()))
    torch.testing.assert_close(v, torch_state["exp_avg_sq"], rtol=0.1,
                               atol=2e-2 * float(torch_state["exp_avg_sq"].abs().max()))
    lin(torch.randn(8, 256)).square().mean().backward()
    opt.step()  # the 8-bit kernel path steps on it
    assert float(w["step"]) == 4 and w["exp_avg"].dtype == torch.uint8


def test_norm_under_cpu_autocast_takes_a_bf16_weight_with_float32_input():
    x, wb = torch.randn(3, 64), torch.rand(64).bfloat16() + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = thrifty.ops.rms_norm(x, wb)
        ref = torch.nn.functional.rms_norm(x, (64,), wb.float(), 1e-6)
        yf, hf = thrifty.ops.rms_norm(x.bfloat16(), wb, residual=x)
    assert y.dtype == ref.dtype == torch.float32 and yf.dtype == hf.dtype == torch.float32
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("opt_cls", ["AdamW", "AdamW8bit", "Lion"])
def test_optimizer_step_bumps_param_versions_as_torchs_in_place_updates(opt_cls):
    """The fused kernels wrote the params behind autograd's back: a graph that saved a param before the step then
    differentiated with the updated weights, silently. torch.optim's steps make that backward an error."""
    w = torch.nn.Parameter(torch.randn(3))
    x = torch.randn(3, requires_grad=True)
    y = (x * w).sum()
    opt = getattr(thrifty.optim, opt_cls)([w], lr=0.5)
    w.grad = torch.ones(3)
    v = w._version
    opt.step()
    assert w._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_multi_tensor_l2norm_refuses_forward_mode_ad():
    x = torch.randn(3)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda t: thrifty.ops.multi_tensor_l2norm([t]), (x,), (torch.ones(3),))


def test_quant_linear_scales_needing_grad_is_an_error_not_a_silent_none():
    s = torch.rand(4, requires_grad=True)
    qw = torch.randint(-127, 128, (4, 64), dtype=torch.int8)
    y = thrifty.ops.quant_linear(torch.randn(3, 64), qw, s, bits=8, group_size=None)
    with pytest.raises(RuntimeError, match="'scales' and 'zeros' get no gradient"):
        y.sum().backward()
    x = torch.randn(3, 64, requires_grad=True)  # x's gradient as before
    thrifty.ops.quant_linear(x, qw, s.detach(), bits=8, group_size=None).sum().backward()
    assert x.grad is not None
