"""thrifty.ops.linear: float64 references on odd shapes at every ISA level (the GEMV rows and the GEMM
path past kLinearGemvMaxM = 16 rows), strides and leading dims, autograd, opcheck, torch.compile,
bad input, and the model's Linear using it for decode rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import thrifty
from reference import DTYPES, assert_close_to_ref

GEMV_MAX_M = 16  # kLinearGemvMaxM in csrc/common/linear_params.h


def check(y, x, w, b, low=None):
    """y against x @ w.T + b in float64; the bar is PyTorch's own error at this precision: on the CPU a
    float32 matmul of the same inputs rounded once to the output dtype (what thrifty's GEMV does), on
    CUDA torch's own F.linear in that dtype (thrifty hands those rows to cuBLAS through at::linear,
    whose bf16/f16 reductions may round partial sums: about twice the error of the float32 matmul)."""
    ref = x.double() @ w.double().t()
    if b is not None:
        ref = ref + b.double()
    if low is not None:  # torch's own result for the very same call (CUDA: same shapes, same cuBLAS kernel)
        pass
    elif x.is_cuda:
        low = F.linear(x, w, b)
    else:
        low = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    assert y.dtype == x.dtype and y.is_contiguous()
    assert_close_to_ref(y, ref, low, atol=1e-5 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_shape_every_isa(cpu_isa, m, dtype, device):
    torch.manual_seed(m)
    x = torch.randn(m, 769, device=device).to(dtype)
    w = torch.randn(1031, 769, device=device).to(dtype)
    b = torch.randn(1031, device=device).to(dtype) if m % 2 else None  # bias on and off across M
    check(thrifty.ops.linear(x, w, b), x, w, b)


# K around the vector widths (8 AVX2 / 16 AVX-512 lanes, 2 steps in flight, 32-step chunks) and N around
# the tiles of 4 and 2 weight rows
@pytest.mark.parametrize("kn", [(1, 3), (7, 5), (8, 4), (15, 1), (16, 9), (17, 2), (31, 6), (33, 17), (511, 7),
                                (513, 3), (1024, 11), (4099, 5)])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 12, 20])
def test_tails(cpu_isa, kn, m):
    k, n = kn
    for dtype in DTYPES:
        torch.manual_seed(k * 100 + n)
        x = torch.randn(m, k).to(dtype)
        w = torch.randn(n, k).to(dtype)
        b = torch.randn(n).to(dtype)
        check(thrifty.ops.linear(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_strides(cpu_isa, dtype, device):
    k, n = 67, 45
    w_big = torch.randn(n, 2 * k + 3, device=device).to(dtype)
    w = w_big[:, 3:k + 3]  # rows strided (contiguous last dim): used in place
    b = torch.randn(n, device=device).to(dtype)
    big = torch.randn(2, 3, 2 * k, device=device).to(dtype)
    for x in (big[..., :k],                      # row stride 2k
              big[..., ::2],                     # last dim strided: one copy of x
              big[:, -1, :k],                    # the decode slice h[:, -1]
              big[0, 0, :k],                     # 1-D x
              torch.randn(4, 5, 3, k, device=device).to(dtype)):  # 3 leading dims, 60 rows
        y = thrifty.ops.linear(x, w, b)
        assert y.shape == (*x.shape[:-1], n)
        check(y.reshape(-1, n), x.reshape(-1, k), w, b,
              low=F.linear(x, w, b).reshape(-1, n) if x.is_cuda else None)


def test_empty_and_k0():
    w = torch.randn(5, 0, dtype=torch.bfloat16)
    b = torch.randn(5, dtype=torch.bfloat16)
    assert torch.equal(thrifty.ops.linear(torch.randn(3, 0, dtype=torch.bfloat16), w, b), b.expand(3, 5))
    assert torch.equal(thrifty.ops.linear(torch.randn(3, 0, dtype=torch.bfloat16), w), torch.zeros(3, 5, dtype=torch.bfloat16))
    assert thrifty.ops.linear(torch.randn(0, 4), torch.randn(5, 4)).shape == (0, 5)
    assert thrifty.ops.linear(torch.randn(2, 4), torch.randn(0, 4)).shape == (2, 0)


def test_nan_and_inf_propagate():
    x = torch.randn(1, 40)
    w = torch.randn(6, 40)
    x[0, 3] = float("nan")
    assert torch.isnan(thrifty.ops.linear(x, w)).all()
    x[0, 3] = 1.0
    w[2, 39] = float("inf")  # in the partial last vector
    y = thrifty.ops.linear(x, w)
    assert torch.isinf(y[0, 2]) and torch.isfinite(y[0, [0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd(m, dtype, device):
    torch.manual_seed(0)
    x0 = torch.randn(2, m, 37, device=device)
    w0 = torch.randn(29, 37, device=device) * 0.2
    b0 = torch.randn(29, device=device)
    g = torch.randn(2, m, 29, device=device)
    x, w, b = (t.to(dtype).requires_grad_() for t in (x0, w0, b0))
    thrifty.ops.linear(x, w, b).backward(g.to(dtype))
    # float64 reference gradients of the same (rounded) inputs
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xr, wr, br).backward(g.to(dtype).double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()
    # only the inputs that need it
    x2 = x.detach().requires_grad_()
    thrifty.ops.linear(x2, w.detach()).sum().backward()
    assert x2.grad is not None


def test_opcheck():
    for m in (1, GEMV_MAX_M + 3):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, m, 24).to(dtype).requires_grad_()
            w = torch.randn(13, 24).to(dtype).requires_grad_()
            b = torch.randn(13).to(dtype).requires_grad_()
            torch.library.opcheck(torch.ops.thrifty.linear, (x, w, b))
            torch.library.opcheck(torch.ops.thrifty.linear, (x.detach(), w.detach(), None))


def test_torch_compile_fullgraph():
    w = torch.randn(11, 24, dtype=torch.bfloat16)
    f = torch.compile(lambda x: thrifty.ops.linear(x, w) * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    assert torch.equal(f(x), thrifty.ops.linear(x, w) * 2)


def test_matches_native_where_exact():
    # small integers: every product and sum is exact in float32, so any correct kernel gives the same bits
    x = torch.randint(-4, 5, (3, 100)).to(torch.bfloat16)
    w = torch.randint(-4, 5, (9, 100)).to(torch.bfloat16)
    b = torch.randint(-4, 5, (9,)).to(torch.bfloat16)
    assert torch.equal(thrifty.ops.linear(x, w, b), F.linear(x.float(), w.float(), b.float()).bfloat16())


BAD = [
    # (x, weight, bias, exception, message)
    (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8), None, TypeError,
     r"argument 'weight' must have the same dtype as 'x' \(BFloat16\), got Float"),
    (torch.randn(2, 8), torch.randn(4, 9), None, ValueError,
     r"argument 'weight' must have size 8 in dimension 1 \(in_features = x.size\(-1\)\), got shape \[4, 9\]"),
    (torch.randn(2, 8), torch.randn(8, 4).t(), None, ValueError,
     r"argument 'weight' must be contiguous in its last dimension \(got strides \[1, 4\]\)"),
    (torch.randn(2, 8), torch.randn(32), None, ValueError, r"argument 'weight' must be 2-D \(got shape \[32\]\)"),
    (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None, TypeError,
     r"argument 'x' must have dtype Float, BFloat16 or Half \(got Double\)"),
    (torch.tensor(1.0), torch.randn(4, 1), None, ValueError, r"argument 'x' must have at least 1 dimension"),
    (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), ValueError,
     r"argument 'bias' must have size 4 in dimension 0 \(out_features = weight.size\(0\)\), got shape \[5\]"),
    (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4), TypeError,
     r"argument 'bias' must have the same dtype as 'x' \(BFloat16\), got Float"),
    (torch.randn(2, 8), torch.randn(4, 8), torch.randn(1, 4), ValueError, r"argument 'bias' must be 1-D"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(i):
    x, w, b, exc, msg = BAD[i]
    with pytest.raises(exc, match="thrifty.linear: " + msg):
        thrifty.ops.linear(x, w, b)


@pytest.mark.cuda
def test_cuda_matches_cpu_checks():
    x = torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="argument 'weight' must have the same dtype as 'x'"):
        thrifty.ops.linear(x, torch.randn(4, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="argument 'weight' must be on the same device as 'x'"):
        thrifty.ops.linear(x, torch.randn(4, 8, dtype=torch.bfloat16))


# ---- the model's Linear: decode rows go through thrifty.ops.linear ----
@pytest.mark.parametrize("rows", [1, GEMV_MAX_M, GEMV_MAX_M + 1])
def test_model_linear_decode_rows(monkeypatch, rows):
    from thrifty.models import _kernels

    calls = []
    real = thrifty.ops.linear
    monkeypatch.setattr(_kernels, "linear", lambda *a: calls.append(1) or real(*a))
    lin = _kernels.use_fast_linear(torch.nn.Sequential(torch.nn.Linear(48, 40))).bfloat16()[0]
    x = torch.randn(1, rows, 48, dtype=torch.bfloat16)
    y = lin(x)
    assert bool(calls) == (rows <= GEMV_MAX_M)
    check(y.reshape(rows, 40), x.reshape(rows, 48), lin.weight, lin.bias)


# ---- the model's Linear over many rows on CPUs without native bf16: float32 compute, low-precision saves ----
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_model_linear_float32_path_saves_no_float32_copies(monkeypatch, dtype, bias):
    """Same output and gradients as autograd through float32 copies, bit for bit, while the backward keeps
    only the low-precision x and weight (the float32 copies of every weight were ~340 MB on `small`)."""
    from thrifty.models import _kernels

    monkeypatch.setattr(_kernels, "_CPU_NATIVE_BF16", False)  # the path every CPU without avx512_bf16 takes
    torch.manual_seed(0)
    lin = _kernels.use_fast_linear(torch.nn.Sequential(torch.nn.Linear(72, 40, bias=bias))).to(dtype)[0]
    x = torch.randn(3, 11, 72).to(dtype).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(x)
    assert saved and all(t.dtype == dtype for t in saved), [t.dtype for t in saved]
    gy = torch.randn_like(y)
    y.backward(gy)

    x2 = x.detach().clone().requires_grad_()
    w2 = lin.weight.detach().clone().requires_grad_()
    b2 = lin.bias.detach().clone().requires_grad_() if bias else None
    y2 = F.linear(x2.float(), w2.float(), None if b2 is None else b2.float()).to(dtype)
    y2.backward(gy)
    assert y.dtype == dtype and torch.equal(y, y2)
    assert torch.equal(x.grad, x2.grad) and torch.equal(lin.weight.grad, w2.grad)
    if bias:
        assert torch.equal(lin.bias.grad, b2.grad)
