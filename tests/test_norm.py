"""RMSNorm (plain and fused add): float64 references, gradients, opcheck, compile, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import thrifty
from reference import DTYPES, assert_close_to_ref

SHAPES = [(1, 8), (3, 769), (2, 5, 1000), (7, 4096), (4, 5125), (33, 3)]


def ref_rms_norm(x, w, eps):
    x64, w64 = x.double(), w.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64


def torch_lowp(x, w, eps):
    # what stock PyTorch computes in the low precision (HF LlamaRMSNorm style, float32 inside)
    return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward(cpu_isa, shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    y = thrifty.ops.rms_norm(x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_to_ref(y, ref_rms_norm(x, w, 1e-5), torch_lowp(x, w, 1e-5), atol=1e-5)


# Outputs of 8 MiB and more take the streaming-store path: rows aligned (4096) and rows whose
# start drifts off the vector alignment (769: a peeled head each row), with bf16 and f32 weights.
@pytest.mark.parametrize("shape", [(1024, 4096), (5462, 769), (2731, 771)])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_forward_large_output(cpu_isa, shape, dtype, wdtype):
    x = torch.randn(shape, dtype=dtype) * 3
    w = torch.randn(shape[-1], dtype=wdtype)
    y = thrifty.ops.rms_norm(x, w, 1e-5)
    assert_close_to_ref(y, ref_rms_norm(x, w, 1e-5), torch_lowp(x, w, 1e-5), atol=1e-5)
    y2, h = thrifty.ops.rms_norm(x, w, 1e-5, residual=x)
    assert torch.equal(h, x + x)
    assert_close_to_ref(y2, ref_rms_norm(x + x, w, 1e-5), torch_lowp(x + x, w, 1e-5), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add(cpu_isa, shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    y, h = thrifty.ops.rms_norm(x, w, 1e-6, residual=r)
    h_lowp = x + r
    assert torch.equal(h, h_lowp), "h must equal the unfused low-precision add"
    assert_close_to_ref(y, ref_rms_norm(h_lowp, w, 1e-6), torch_lowp(h_lowp, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weight_with_low_precision_x(cpu_isa, dtype, device):
    x = torch.randn(6, 777, dtype=dtype, device=device)
    w = torch.randn(777, device=device)
    y = thrifty.ops.rms_norm(x, w)
    assert y.dtype == dtype
    ref = ref_rms_norm(x, w, 1e-6)
    assert_close_to_ref(y, ref, (ref_rms_norm(x, w, 1e-6)).to(dtype), factor=1.0, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 769), (5, 1000), (9, 2056)])
def test_backward_float32_weight_with_low_precision_x(cpu_isa, dtype, shape, device):
    """bf16/f16 activations with a float32 weight (the kernels' mixed weight type): grad_x in x's dtype,
    grad_weight in float32, against float64 autograd on the same (rounded) values."""
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(shape[-1], device=device, requires_grad=True)
    gy = torch.randn(shape, dtype=dtype, device=device)
    (thrifty.ops.rms_norm(x, w) * gy).sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (ref_rms_norm(xd, wd, 1e-6) * gy.double()).sum().backward()
    assert_close_to_ref(x.grad, xd.grad, xd.grad.to(dtype), factor=2.0, atol=1e-3, name="grad_x")
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-4 * shape[0])


def rms_norm_backward(x, w, r, gy, gh, fused):
    """thrifty.ops.rms_norm forward and backward with output grads gy (and gh for h = x + r when fused); returns y."""
    if fused:
        y, h = thrifty.ops.rms_norm(x, w, 1e-6, residual=r)
        (y * gy).sum().add_((h * gh).sum()).backward()
    else:
        y = thrifty.ops.rms_norm(x, w, 1e-6)
        (y * gy).sum().backward()
    return y


# Rows wide enough for each CUDA backward variant: 1, 2 and 4 vectors per thread in registers (64..8192),
# shared-memory partial sums beyond (8256) and for unaligned widths (769).
@pytest.mark.parametrize("shape", [(3, 769), (2, 5, 1000), (300, 64), (9, 2056), (37, 4096), (5, 8192), (3, 8256)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_backward(cpu_isa, shape, dtype, fused, device):
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    r = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(shape[-1], dtype=dtype, device=device, requires_grad=True)
    gy = torch.randn(shape, dtype=dtype, device=device)
    gh = torch.randn(shape, dtype=dtype, device=device)
    rms_norm_backward(x, w, r, gy, gh, fused)
    grads = [x.grad, w.grad] + ([r.grad] if fused else [])

    def run_ref(cast):
        xs, rs, ws = [t.detach().to(cast).requires_grad_() for t in (x, r, w)]
        hh = xs + rs if fused else xs
        if cast == torch.float64:
            yy = ref_rms_norm(hh, ws, 1e-6)
        else:
            yy = F.rms_norm(hh, (shape[-1],), ws, 1e-6)
        loss = (yy * gy.to(cast)).sum()
        if fused:
            loss = loss + (hh * gh.to(cast)).sum()
        loss.backward()
        return [xs.grad, ws.grad] + ([rs.grad] if fused else [])

    for got, ref, low, name in zip(grads, run_ref(torch.float64), run_ref(dtype), ["x", "weight", "residual"]):
        assert_close_to_ref(got, ref, low, factor=2.0, atol=1e-4 * (shape[0] if name == "weight" else 1),
                            name=f"grad_{name}")


def test_backward_deterministic(cpu_isa):
    x = torch.randn(513, 1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    gy = torch.randn(513, 1000)
    outs = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            x.grad = w.grad = None
            (thrifty.ops.rms_norm(x, w) * gy).sum().backward()
            outs.append((x.grad.clone(), w.grad.clone()))
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_strided_inputs(device):
    base = torch.randn(6, 2 * 769, device=device)
    x = base[:, :769]  # row stride 1538: used in place
    w = torch.randn(769, device=device)
    torch.testing.assert_close(thrifty.ops.rms_norm(x, w), ref_rms_norm(x, w, 1e-6).float())
    xt = torch.randn(769, 6, device=device).t()  # last dim not contiguous: copied, still right
    torch.testing.assert_close(thrifty.ops.rms_norm(xt, w), ref_rms_norm(xt, w, 1e-6).float())
    x3 = torch.randn(4, 3, 769, device=device).transpose(0, 1)  # leading dims not collapsible
    torch.testing.assert_close(thrifty.ops.rms_norm(x3, w), ref_rms_norm(x3, w, 1e-6).float())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["step2", "expanded"])
def test_strided_weight_forward_and_backward(fused, kind):
    # a non-contiguous weight (every other value of a longer vector, or one value broadcast): right
    # answer, and the weight grad reaches the strided view (the expanded one sums into its base)
    hidden = 769
    if kind == "step2":
        base = torch.randn(2 * hidden, dtype=torch.float64).float().requires_grad_()
        w = base[::2]
    else:
        base = torch.randn(1).requires_grad_()
        w = base.expand(hidden)
    x = torch.randn(5, hidden, requires_grad=True)
    r = torch.randn(5, hidden, requires_grad=True)
    gy, gh = torch.randn(5, hidden), torch.randn(5, hidden)
    y = rms_norm_backward(x, w, r, gy, gh, fused)
    got = [y, x.grad, base.grad]

    def run_ref(cast):
        xs, rs, bs = [t.detach().to(cast).requires_grad_() for t in (x, r, base)]
        ws = bs[::2] if kind == "step2" else bs.expand(hidden)
        hh = xs + rs if fused else xs
        yy = ref_rms_norm(hh, ws, 1e-6) if cast == torch.float64 else F.rms_norm(hh, (hidden,), ws, 1e-6)
        loss = (yy * gy.to(cast)).sum() + ((hh * gh.to(cast)).sum() if fused else 0)
        loss.backward()
        return [yy.detach(), xs.grad, bs.grad]

    for g, ref, low, name in zip(got, run_ref(torch.float64), run_ref(torch.float32), ["y", "grad_x", "grad_weight"]):
        assert_close_to_ref(g, ref, low, factor=2.0, atol=1e-4 * (5 if name == "grad_weight" else 1), name=name)
    if fused:
        torch.testing.assert_close(r.grad, x.grad, rtol=0, atol=0)


def test_empty_and_nonfinite():
    assert thrifty.ops.rms_norm(torch.empty(0, 64), torch.ones(64)).shape == (0, 64)
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    y = thrifty.ops.rms_norm(x, torch.ones(64))
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    x = torch.randn(3, 5, 129, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(129, dtype=dtype, device=device, requires_grad=True)
    r = torch.randn(3, 5, 129, dtype=dtype, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.thrifty.rms_norm, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.thrifty.fused_add_rms_norm, (x, r, w, 1e-6))
    gy = torch.randn_like(x)
    rstd = torch.ops.thrifty.rms_norm(x, w, 1e-6)[1].detach()
    torch.library.opcheck(torch.ops.thrifty.rms_norm_backward, (gy, x.detach(), w.detach(), rstd, None))
    torch.library.opcheck(torch.ops.thrifty.rms_norm_backward, (gy, x.detach(), w.detach(), rstd, gy))


def test_torch_compile_fullgraph():
    norm = thrifty.nn.RMSNorm(96)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, r):
        y, h = thrifty.ops.rms_norm(x, norm.weight, 1e-6, residual=r)
        return norm(y).sum() + h.sum()

    x = torch.randn(4, 96, requires_grad=True)
    r = torch.randn(4, 96)
    out = block(x, r)
    out.backward()
    y_ref, h_ref = thrifty.ops.rms_norm(x, norm.weight, 1e-6, residual=r)
    torch.testing.assert_close(out, norm(y_ref).sum() + h_ref.sum())
    assert x.grad is not None


def test_module_matches_torch_and_hf_state_dict():
    m = thrifty.nn.RMSNorm(300, eps=1e-5)
    ref = torch.nn.RMSNorm(300, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 300)
    torch.testing.assert_close(m(x), ref(x))
    assert set(m.state_dict()) == {"weight"}
    assert m.variance_epsilon == 1e-5 and m.eps == 1e-5


BAD = [
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8, dtype=torch.float64), torch.ones(8)), TypeError, "'x' must have dtype"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(7)), ValueError, "'weight' must have size 8"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(2, 8)), ValueError, "'weight' must be 1-D"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(8, dtype=torch.int32)), TypeError, "'weight' must have the dtype"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.float16)), TypeError, "'weight' must have the dtype"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(8), residual=torch.randn(3, 9)), ValueError, "'residual' must have the same shape"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(8), residual=torch.randn(3, 8).half()), TypeError, "'residual' must have the same dtype"),
    (lambda: thrifty.ops.rms_norm(torch.randn(()), torch.ones(1)), ValueError, "'x' must have at least 1"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(8), eps=float("nan")), ValueError, "'eps' must be finite"),
    (lambda: thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(8), eps=-1.0), ValueError, "'eps' must be finite"),
    (lambda: torch.ops.thrifty.rms_norm_backward(torch.randn(3, 8), torch.randn(3, 8), torch.ones(8), torch.ones(2), None), ValueError, "'rstd' must have one value per row"),
    (lambda: torch.ops.thrifty.rms_norm_backward(torch.randn(3, 9), torch.randn(3, 8), torch.ones(8), torch.ones(3), None), ValueError, "'grad_y' must have the same shape"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(i):
    fn, exc, msg = BAD[i]
    with pytest.raises(exc, match=msg):
        fn()


@pytest.mark.cuda
def test_device_mismatch():
    with pytest.raises(RuntimeError, match="'weight' must be on the same device"):
        thrifty.ops.rms_norm(torch.randn(3, 8, device="cuda"), torch.ones(8))
