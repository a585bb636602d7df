"""SwiGLU: float64 references on odd shapes, gradients, fused gate_up slices, nn.SwiGLU vs
Hugging Face LlamaMLP, opcheck, compile, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import thrifty
from reference import DTYPES, assert_close_to_ref

SHAPES = [(1, 1), (3, 769), (2, 5, 1000), (4, 5125), (33, 3), (7,), (2, 3, 4, 17)]


def ref(g, u, cast=torch.float64):
    g, u = g.to(cast), u.to(cast)
    return F.silu(g) * u


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(cpu_isa, shape, dtype, device):
    g = torch.randn(shape, dtype=dtype, device=device) * 3
    u = torch.randn(shape, dtype=dtype, device=device)
    out = thrifty.ops.swiglu(g, u)
    assert out.shape == g.shape and out.dtype == dtype
    assert_close_to_ref(out, ref(g, u), ref(g, u, dtype), atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 769), (2, 5, 1000), (33, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(cpu_isa, shape, dtype, device):
    g = (torch.randn(shape, dtype=dtype, device=device) * 3).requires_grad_()
    u = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    go = torch.randn(shape, dtype=dtype, device=device)
    (thrifty.ops.swiglu(g, u) * go).sum().backward()

    def run_ref(cast):
        gs, us = g.detach().to(cast).requires_grad_(), u.detach().to(cast).requires_grad_()
        (F.silu(gs) * us * go.to(cast)).sum().backward()
        return gs.grad, us.grad

    (rg, ru), (lg, lu) = run_ref(torch.float64), run_ref(dtype)
    assert_close_to_ref(g.grad, rg, lg, atol=1e-6, name="grad_gate")
    assert_close_to_ref(u.grad, ru, lu, atol=1e-6, name="grad_up")


# Outputs of 8 MiB and more take the streaming-store path when rows are 64-byte aligned
# ((1024, 4096)); (2049, 1031) is as large with unaligned rows (normal stores).
@pytest.mark.parametrize("shape", [(1024, 4096), (2049, 1031)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_output(cpu_isa, shape, dtype):
    g = torch.randn(shape, dtype=dtype) * 3
    u = torch.randn(shape, dtype=dtype)
    assert_close_to_ref(thrifty.ops.swiglu(g, u), ref(g, u), ref(g, u, dtype), atol=1e-6)
    go = torch.randn(shape, dtype=dtype)
    gg, gu = torch.ops.thrifty.swiglu_backward(go, g, u)
    g64 = g.double().requires_grad_()
    (F.silu(g64) * u.double() * go.double()).sum().backward()
    gl = g.clone().requires_grad_()
    (F.silu(gl) * u * go).sum().backward()
    assert_close_to_ref(gg, g64.grad, gl.grad, atol=1e-6, name="grad_gate")
    assert_close_to_ref(gu, go.double() * F.silu(g.double()), go * F.silu(g), atol=1e-6, name="grad_up")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_values(cpu_isa, dtype, device):
    # |gate| far past sigmoid's saturation: silu(g) = g * sigmoid(g) is -0 for g << 0 and g for g >> 0, and
    # its derivative 0 and 1, at every ISA level (the vector sigmoid clamps its argument at +-87, and the
    # saturated side must then be 0, not exp(-87) times a huge g). 37 values: full vectors and a tail.
    vals = [-1e38, -1e30, -1e20, -1e4, -100.0, -88.0, -20.0, 0.0, 20.0, 88.0, 100.0, 1e4, 1e20, 1e30, 1e38]
    g = torch.tensor((vals * 3)[:37], device=device).to(dtype)
    u = torch.ones_like(g)
    ref = F.silu(g.double()) * u.double()
    torch.testing.assert_close(thrifty.ops.swiglu(g, u).double(), ref.to(dtype).double(), rtol=1e-2, atol=1e-30)
    gg, gu = torch.ops.thrifty.swiglu_backward(torch.ones_like(g), g, u)
    gs = g.double().clone().requires_grad_()
    (F.silu(gs) * u.double()).sum().backward()
    torch.testing.assert_close(gg.double(), gs.grad.to(dtype).double(), rtol=1e-2, atol=1e-30)
    torch.testing.assert_close(gu.double(), ref.to(dtype).double(), rtol=1e-2, atol=1e-30)
    # inf gates: torch's own conventions (silu(inf) = inf, silu(-inf) = -inf * 0 = nan)
    i = torch.tensor([float("inf"), float("-inf")] * 9, device=device).to(dtype)
    torch.testing.assert_close(thrifty.ops.swiglu(i, torch.ones_like(i)), F.silu(i), equal_nan=True)
    x = torch.tensor([float("nan"), 1.0])
    assert torch.isnan(thrifty.ops.swiglu(x, torch.ones(2))[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gate_up_slices(dtype, device):
    n = 769
    gate_up = torch.randn(2, 6, 2 * n, dtype=dtype, device=device, requires_grad=True)
    g, u = gate_up.chunk(2, dim=-1)  # row stride 2n: read in place
    assert not g.is_contiguous()
    out = thrifty.ops.swiglu(g, u)
    assert_close_to_ref(out, ref(g, u), ref(g, u, dtype), atol=1e-6)
    out.sum().backward()
    gs = gate_up.detach().double().requires_grad_()
    a, b = gs.chunk(2, -1)
    (F.silu(a) * b).sum().backward()
    torch.testing.assert_close(gate_up.grad.double(), gs.grad, atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=2e-2 if dtype != torch.float32 else 1e-5)
    # last dim not contiguous, leading dims not collapsible: copied, still right
    gt, ut = torch.randn(17, 5, device=device).t(), torch.randn(17, 5, device=device).t()
    torch.testing.assert_close(thrifty.ops.swiglu(gt, ut), F.silu(gt) * ut)
    g3 = torch.randn(4, 3, 33, device=device).transpose(0, 1)
    torch.testing.assert_close(thrifty.ops.swiglu(g3, g3), F.silu(g3) * g3)


def test_empty():
    assert thrifty.ops.swiglu(torch.empty(0, 5), torch.empty(0, 5)).shape == (0, 5)
    assert thrifty.ops.swiglu(torch.empty(3, 0), torch.empty(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_hf_llama_mlp(bias):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=96, intermediate_size=257, mlp_bias=bias, hidden_act="silu")
    hf = LlamaMLP(cfg)
    m = thrifty.nn.SwiGLU(96, 257, bias=bias)
    assert set(m.state_dict()) == set(hf.state_dict())
    m.load_state_dict(hf.state_dict())
    x = torch.randn(2, 7, 96, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, hf(x), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    hf(x).sum().backward()
    torch.testing.assert_close(g1, x.grad, atol=1e-5, rtol=1e-5)
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), hf.named_parameters()):
        assert n1 == n2


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    g = torch.randn(3, 5, 129, dtype=dtype, device=device, requires_grad=True)
    u = torch.randn(3, 5, 129, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.thrifty.swiglu, (g, u))
    torch.library.opcheck(torch.ops.thrifty.swiglu_backward, (torch.randn_like(g), g.detach(), u.detach()))
    gu = torch.randn(4, 2 * 65, dtype=dtype, device=device, requires_grad=True)
    a, b = gu.chunk(2, -1)
    torch.library.opcheck(torch.ops.thrifty.swiglu, (a, b))


def test_torch_compile_fullgraph():
    mlp = thrifty.nn.SwiGLU(48, 80)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        gu = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1)
        g, u = gu.chunk(2, -1)
        return mlp(x).sum() + thrifty.ops.swiglu(g, u).square().sum()

    x = torch.randn(5, 48, requires_grad=True)
    out = f(x)
    out.backward()
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    torch.testing.assert_close(out, mlp(x).sum() + (F.silu(g) * u).square().sum())
    assert x.grad is not None


BAD = [
    (lambda: thrifty.ops.swiglu(torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)), TypeError,
     "'gate' must have dtype Float, BFloat16 or Half"),
    (lambda: thrifty.ops.swiglu(torch.randn(3, 8), torch.randn(3, 8).half()), TypeError, "'up' must have the same dtype as 'gate'"),
    (lambda: thrifty.ops.swiglu(torch.randn(3, 8), torch.randn(3, 9)), ValueError, "'up' must have the same shape as 'gate'"),
    (lambda: thrifty.ops.swiglu(torch.randn(3, 8), torch.randn(8)), ValueError, "'up' must have the same shape as 'gate'"),
    (lambda: torch.ops.thrifty.swiglu(torch.randn(()), torch.randn(())), ValueError, "'gate' must have at least 1"),
    (lambda: torch.ops.thrifty.swiglu(torch.randn((), device="meta"), torch.randn((), device="meta")), ValueError,
     "'gate' must have at least 1"),
    (lambda: thrifty.ops.swiglu(torch.randn(()), torch.randn(3)), ValueError, "'gate' must have at least 1"),
    (lambda: thrifty.ops.swiglu(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32)), TypeError, "'gate' must have dtype"),
    (lambda: torch.ops.thrifty.swiglu_backward(torch.randn(3, 7), torch.randn(3, 8), torch.randn(3, 8)), ValueError,
     "'grad' must have the same shape as 'gate'"),
    (lambda: torch.ops.thrifty.swiglu_backward(torch.randn(3, 8).bfloat16(), torch.randn(3, 8), torch.randn(3, 8)), TypeError,
     "'grad' must have the same dtype as 'gate'"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(i):
    fn, exc, msg = BAD[i]
    with pytest.raises(exc, match=msg):
        fn()


@pytest.mark.cuda
def test_device_mismatch():
    with pytest.raises(RuntimeError, match="'up' must be on the same device"):
        thrifty.ops.swiglu(torch.randn(3, 8, device="cuda"), torch.randn(3, 8))


def test_fused_gate_up_slices_are_not_copied():
    gate_up = torch.randn(3, 4, 2 * 100)
    g, u = gate_up.chunk(2, dim=-1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.thrifty.swiglu(g, u)
        torch.ops.thrifty.swiglu_backward(torch.randn(3, 4, 100), g, u)
    assert [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")] == []


def test_scalars_as_torch_takes_them():
    g = torch.tensor(0.7, requires_grad=True)
    u = torch.tensor(-1.3, requires_grad=True)
    y = thrifty.ops.swiglu(g, u)
    assert y.shape == ()
    y.backward()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    ref = torch.nn.functional.silu(g2) * u2
    ref.backward()
    torch.testing.assert_close(y.detach(), ref.detach())
    torch.testing.assert_close((g.grad, u.grad), (g2.grad, u2.grad))
    assert thrifty.ops.swiglu(torch.randn((), device="meta"), torch.randn((), device="meta")).shape == ()
