"""Quantized linear ops, QuantLinear, importers, GPTQ, whole-model quantization: float64
references of each op's own dequantized weights, every ISA level, opcheck, bad input."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import thrifty
from conftest import cpu_isa_with_bf16_dot_fixture, needs_cuda_emulation, run_cuda_emulation
from reference import DTYPES, assert_close_to_ref
from thrifty.nn import QuantLinear
from thrifty.quant import formats as qf

# 5 and 7: the float GEMV splits M > 4 into two passes (3+2, 4+3; the bf16 dot GEMV takes them in one)
MS = [1, 3, 4, 5, 7, 8, 9, 300]
cpu_isa = cpu_isa_with_bf16_dot_fixture()  # the W4 GEMV of bf16 x: VDPBF16PS and FMA at avx512_bf16


def ref_unpack4(qweight):
    """Independent of thrifty: (N, K/2) uint8 -> (N, K) codes, k even in the low nibble."""
    n, h = qweight.shape
    out = torch.empty(n, 2 * h, dtype=torch.int64)
    out[:, 0::2] = (qweight & 15).long()
    out[:, 1::2] = (qweight >> 4).long()
    return out


def ref_deq4(qweight, scales, zeros, g):
    q = ref_unpack4(qweight).double()
    return (q - zeros.double().repeat_interleave(g, 1)) * scales.double().repeat_interleave(g, 1)


def rand_w4(n, k, g, device="cpu"):
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    s = (torch.rand(n, k // g, device=device) + 0.05) * 0.02
    z = torch.randint(0, 17, (n, k // g), device=device).float()
    return qw, s, z


def rand_w8(n, k, device="cpu"):
    return (torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device),
            (torch.rand(n, device=device) + 0.05) * 0.01)


def check_linear(y, x, w64, bias, dtype):
    ref = x.double() @ w64.t()
    if bias is not None:
        ref = ref + bias.double()
    # PyTorch's own result at this precision: float32 matmul of the same weights, rounded to the output dtype
    low = F.linear(x.float(), w64.float(), None if bias is None else bias.float()).to(dtype)
    assert y.dtype == dtype
    assert_close_to_ref(y, ref, low, atol=1e-5 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kng", [(96, 37, 32), (192, 65, 64), (384, 19, 128), (4096, 9, 128)])
def test_w4a16(cpu_isa, m, dtype, kng, device):
    bias = m % 2 == 1  # bias on and off across the M values
    k, n, g = kng
    qw, s, z = rand_w4(n, k, g, device)
    x = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    y = thrifty.ops.quant_linear(x, qw, s, z, bits=4, group_size=g, bias=b)
    check_linear(y, x, ref_deq4(qw.cpu(), s.cpu(), z.cpu(), g).to(device), b, dtype)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kn", [(67, 37), (256, 65), (1000, 9), (1024, 70)])
def test_w8a16(cpu_isa, m, dtype, kn, device):
    bias = m % 2 == 0
    k, n = kn
    q, s = rand_w8(n, k, device)
    x = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, device=device) if bias else None  # float32 bias with low-precision x is allowed
    y = thrifty.ops.quant_linear(x, q, s, None, bits=8, group_size=-1, bias=b)
    check_linear(y, x, q.double() * s.double()[:, None], b, dtype)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("kn", [(67, 37), (256, 65), (1031, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8(cpu_isa, m, kn, bias, device):
    out_dtype = torch.bfloat16 if kn[0] == 256 else None
    k, n = kn
    wq, ws = rand_w8(n, k, device)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)  # -128 included: must be exact
    xs = torch.rand(m, 1, device=device) + 0.01
    b = torch.randn(n, device=device) if bias else None
    y = thrifty.ops.int8_linear(xq, xs, wq, ws, b, out_dtype=out_dtype)
    acc = (xq.cpu().long() @ wq.cpu().long().t()).double().to(device)  # exact integer reference
    ref = acc * xs.double() * ws.double()
    if bias:
        ref = ref + b.double()
    assert y.dtype == (out_dtype or torch.float32)
    tol = (2 ** -7 if out_dtype == torch.bfloat16 else 1e-6) * ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol


def test_w8a8_extreme_values_exact(cpu_isa):
    """int8 extremes over a long K (several k-blocks and a tail of 3): the GEMM path's integer sums stay
    exact, including the u8-shifted x and the weight-sum correction of the VNNI path."""
    m, k, n = 13, 4099, 101  # n: one whole 64-column panel and a partial one
    g = torch.Generator().manual_seed(0)
    pick = torch.tensor([-128, -127, 127, 0], dtype=torch.int8)
    xq = pick[torch.randint(0, 4, (m, k), generator=g)]
    xq[0] = -128  # a row of -128 against rows of -128 / 127 weights: the largest sums
    wq = pick[torch.randint(0, 4, (n, k), generator=g)]
    wq[0], wq[1] = -128, 127
    xs, ws = torch.ones(m, 1), torch.ones(n)
    y = thrifty.ops.int8_linear(xq, xs, wq, ws)
    ref = (xq.long() @ wq.long().t()).float()  # unit scales: the exact sum rounded once to float32
    assert torch.equal(y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 130), (300, 64)])
def test_quantize_per_token(cpu_isa, dtype, shape, device):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    x.view(-1, shape[-1])[0].zero_()  # an all-zero row
    xq, xs = thrifty.ops.quantize_per_token(x)
    assert xq.dtype == torch.int8 and xq.shape == x.shape and xs.shape == (*shape[:-1], 1)
    amax = x.float().abs().amax(-1, keepdim=True)
    # amax / 127 correctly rounded (torch on CUDA turns a division by a Python scalar into a
    # multiplication by its reciprocal, one ulp off; a tensor divisor divides)
    torch.testing.assert_close(xs, amax / torch.full_like(amax, 127.0), rtol=0, atol=0)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))  # (127.0 / t is reciprocal * 127)
    assert torch.equal(xq, torch.round(x.float() * inv).clamp(-127, 127).to(torch.int8))
    assert (xq.float() * xs - x.float()).abs().le(xs / 2 + 1e-6).all()


# CUDA paths: bf16/f16 x and M <= 32 on the tensor-core kernels (w4_mma.cuh, w8_mma.cuh; with the switch on,
# the default), GEMV buckets M in {1, 2, 4, 8} (vector kernel, and the scalar one for x rows that are not 16-byte
# aligned), the cuBLAS path above M = 8 (bits 4: dequantized hi/lo split for bf16/f16), and W8A8's
# at::_int_mm (K and N multiples of 8; M <= 16 zero-padded) against the __dp4a kernel for the other shapes.
def _quant_linear_cuda(x, n, bits, g, b):
    """quant_linear of x (M, K) with random (n, K) CUDA weights of `bits` (group g for 4): (y, x, float64 weight)."""
    k = x.shape[1]
    if bits == 4:
        qw, s, z = rand_w4(n, k, g, "cuda")
        y = thrifty.ops.quant_linear(x, qw, s, z, bits=4, group_size=g, bias=b)
        return y, x, ref_deq4(qw.cpu(), s.cpu(), z.cpu(), g).cuda()
    qw, s = rand_w8(n, k, "cuda")
    y = thrifty.ops.quant_linear(x, qw, s, None, bits=8, group_size=-1, bias=b)
    return y, x, qw.double() * s.double()[:, None]


@pytest.fixture(params=["on", "off"], ids=["mma", "nomma"])
def quant_mma(request):
    prev = thrifty._C.set_cuda_quant_mma(request.param)
    yield request.param
    thrifty._C.set_cuda_quant_mma(prev)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 2, 4, 6, 8, 9, 12, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, g", [(4, 128), (4, 32), (4, 96), (4, 256), (8, None)])  # 96: 32-k segments
@pytest.mark.parametrize("aligned", [True, False])
def test_quant_linear_cuda_paths(quant_mma, m, dtype, bits, g, aligned):
    k, n = (768 if g == 256 else 1152), 72  # K / segment not a multiple of the kernel's 8 warps x 4 in flight
    base = torch.randn(m, k if aligned else k + 1, device="cuda").to(dtype)
    x = base[:, :k]  # unaligned: row stride k + 1 elements, not a multiple of 16 bytes
    b = torch.randn(n, device="cuda").to(dtype) if m % 2 == 0 else None
    check_linear(*_quant_linear_cuda(x, n, bits, g, b), b, dtype)


# The CUDA W4A16 / W8A16 tensor-core kernels' lane / k-slot mapping, in-register dequantization and zero-point /
# offset corrections, checked without a GPU: tests/cuda_emulated/quant_mma_emulate.cpp compiles the kernels' own
# sources (w4_mma.cuh, w8_mma.cuh) with g++, runs each CUDA thread as a std::thread (shuffles, mma.sync m16n8k16
# and __syncthreads emulated) and compares against float64 on odd shapes, group sizes 32..256, M 1..32, K splits,
# bf16 and f16.
@needs_cuda_emulation
def test_quant_mma_kernels_in_warp_emulator(tmp_path):
    run_cuda_emulation("quant_mma_emulate.cpp", tmp_path)


# The CUDA W8A8 decode kernel (int8_mma.cuh, mma m16n8k32 s8) in the same emulator, bit for bit against exact
# integer dot products through the same epilogue, M 1..32, K splits 1..4.
@needs_cuda_emulation
def test_int8_mma_kernel_in_warp_emulator(tmp_path):
    run_cuda_emulation("int8_mma_emulate.cpp", tmp_path)


@pytest.mark.skipif(not hasattr(thrifty._C, "set_cuda_quant_mma"), reason="built without CUDA")
def test_cuda_quant_mma_switch_names():
    prev = thrifty._C.set_cuda_quant_mma("off")
    try:
        assert thrifty._C.cuda_quant_mma() is False
        assert thrifty._C.set_cuda_quant_mma("on") == "off" and thrifty._C.cuda_quant_mma() is True
        with pytest.raises(ValueError, match="unknown mode 'fast'; expected on or off"):
            thrifty._C.set_cuda_quant_mma("fast")
    finally:
        thrifty._C.set_cuda_quant_mma(prev)


# Few rows and a long K: the W4 / W8 tensor-core kernels split K over more blocks (2 to 16 here) and a second
# kernel adds the splits' sums.
@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5, 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, g", [(4, 128), (4, 32), (8, None)])
def test_quant_linear_cuda_mma_split_k(m, dtype, bits, g):
    k, n = 8192, 40
    x = torch.randn(m, k, device="cuda").to(dtype)
    b = torch.randn(n, device="cuda").to(dtype)
    check_linear(*_quant_linear_cuda(x, n, bits, g, b), b, dtype)


# W8A8 on CUDA: M <= 32 with K % 64 == 0 on the int8 mma kernel (int8_mma.cuh; switch on), else at::_int_mm
# (K, N multiples of 8; M <= 16 zero-padded) or the __dp4a kernel (the other shapes); K = 8192 with few rows
# splits K over more blocks.
@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("kn", [(256, 72), (256, 70), (260, 72), (8192, 40)])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16])
def test_int8_linear_cuda_paths(quant_mma, m, kn, out_dtype):
    k, n = kn
    wq, ws = rand_w8(n, k, "cuda")
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    xs = torch.rand(m, 1, device="cuda") + 0.01
    b = torch.randn(n, device="cuda").bfloat16()
    y = thrifty.ops.int8_linear(xq, xs, wq, ws, b, out_dtype=out_dtype)
    acc = (xq.cpu().long() @ wq.cpu().long().t()).double().cuda()
    ref = acc * xs.double() * ws.double() + b.double()
    assert y.dtype == (out_dtype or torch.float32)
    tol = (2 ** -7 if out_dtype is not None else 1e-6) * ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol


def test_leading_dims_and_strided_x():
    qw, s, z = rand_w4(20, 128, 32)
    x = torch.randn(2, 3, 256)[..., :128]  # row stride 256
    y = thrifty.ops.quant_linear(x, qw, s, z, bits=4, group_size=32)
    assert y.shape == (2, 3, 20)
    ref = x.double() @ ref_deq4(qw, s, z, 32).t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


# GEMV (groups of 64: the W4 dot GEMV's even/odd copy of x; of 32: x read in place), GEMM (bf16: the
# VDPBF16PS paths pack x rows themselves)
@pytest.mark.parametrize("m", [3, 5, 9, 300])
@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_x_with_odd_row_stride_and_offset(cpu_isa, m, bits):
    k, n, g = 128, 37, 64 if m <= 4 else 32
    base = torch.randn(m * (k + 1) + 1).bfloat16()
    x = base[1:].view(m, k + 1)[:, :k]  # rows start at odd bf16 offsets: no 4-byte alignment
    assert x.stride(0) == k + 1 and x.storage_offset() == 1
    if bits == 4:
        qw, s, z = rand_w4(n, k, g)
        y = thrifty.ops.quant_linear(x, qw, s, z, bits=4, group_size=g)
        w64 = ref_deq4(qw, s, z, g)
    else:
        qw, s = rand_w8(n, k)
        y = thrifty.ops.quant_linear(x, qw, s, bits=8, group_size=None)
        w64 = qw.double() * s.double()[:, None]
    check_linear(y, x, w64, None, torch.bfloat16)


def test_dequantize_exact():
    qw, s, z = rand_w4(13, 256, 64)
    assert torch.equal(thrifty.ops.dequantize(qw, s, z, bits=4, group_size=64), ref_deq4(qw, s, z, 64).float())
    q, s8 = rand_w8(13, 77)
    assert torch.equal(thrifty.ops.dequantize(q, s8, bits=8, group_size=-1), q.float() * s8[:, None])


def test_pack_roundtrip():
    q = torch.randint(0, 16, (9, 64), dtype=torch.uint8)
    p = qf.pack_int4(q)
    assert torch.equal(ref_unpack4(p), q.long()) and torch.equal(qf.unpack_int4(p), q)
    assert torch.equal(qf.to_kernel_layout(p, "cpu"), p)


def test_autograd_x_and_bias():
    qw, s, z = rand_w4(24, 128, 32)
    x = torch.randn(5, 128, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(24, requires_grad=True)
    gy = torch.randn(5, 24)
    (thrifty.ops.quant_linear(x, qw, s, z, bits=4, group_size=32, bias=b) * gy).sum().backward()
    w = ref_deq4(qw, s, z, 32)
    torch.testing.assert_close(x.grad.double(), gy.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, gy.sum(0))


def test_opcheck():
    qw, s, z = rand_w4(10, 64, 32)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    torch.library.opcheck(torch.ops.thrifty.quant_linear, (x, qw, s, z, 4, 32, b))
    q8, s8 = rand_w8(10, 64)
    torch.library.opcheck(torch.ops.thrifty.quant_linear, (x, q8, s8, None, 8, -1, None))
    torch.library.opcheck(torch.ops.thrifty.quant_dequantize, (qw, s, z, 4, 32))
    torch.library.opcheck(torch.ops.thrifty.quantize_per_token, (torch.randn(2, 3, 65),))
    xq, xs = torch.ops.thrifty.quantize_per_token(torch.randn(4, 64))
    torch.library.opcheck(torch.ops.thrifty.int8_linear, (xq, xs, q8, s8, b.detach(), None))


def test_torch_compile_fullgraph():
    lin = nn.Linear(64, 32)
    m4 = QuantLinear.from_float(lin, bits=4, group_size=32)
    m8 = QuantLinear.from_float(lin, bits=8, act_bits=8)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return m4(x) + m8(x)

    x = torch.randn(3, 64)
    torch.testing.assert_close(f(x), m4(x) + m8(x))


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_compile_fullgraph_weights_as_dynamic_arguments(bits):
    """The packed weight passed in, its shape changing between calls (torch then recompiles with symbolic
    shapes): the x check's message was an f-string joined to another string on every call, which Dynamo
    cannot trace over a symbolic shape."""
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, qw, s, z):
        return thrifty.ops.quant_linear(x, qw, s, z, bits=bits, group_size=-1 if bits == 8 else 32)

    for n, k in ((24, 64), (40, 96), (8, 128)):
        x = torch.randn(5, k)
        if bits == 8:
            qw, s, z = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n), None
        else:
            qw, s, z = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), torch.rand(n, k // 32), \
                torch.randint(0, 16, (n, k // 32)).float()
        torch.testing.assert_close(f(x, qw, s, z), thrifty.ops.quant_linear(x, qw, s, z, bits=bits,
                                                                           group_size=-1 if bits == 8 else 32))
    with pytest.raises(ValueError, match=r"in_features K=128 in its last dimension \(qweight \(8, "):
        thrifty.ops.quant_linear(torch.randn(5, 7), qw, s, z, bits=bits, group_size=-1 if bits == 8 else 32)


# ---------------- QuantLinear ----------------
@pytest.mark.parametrize("bits,act_bits,method", [(8, 16, "rtn"), (4, 16, "rtn"), (8, 8, "rtn"), (4, 16, "gptq"),
                                                  (8, 16, "gptq")])
def test_quantlinear_matches_its_dequantized_weight(bits, act_bits, method):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    calib = torch.randn(256, 128)
    m = QuantLinear.from_float(lin, bits=bits, group_size=64, method=method, act_bits=act_bits, calibration=calib)
    w = m.dequantize()
    assert w.dtype == torch.float32 and w.shape == (48, 128)
    x = torch.randn(7, 128)
    if act_bits == 8:
        xq, xs = thrifty.ops.quantize_per_token(x)
        ref = (xq.double() * xs.double()) @ w.double().t() + lin.bias.double()
    else:
        ref = x.double() @ w.double().t() + lin.bias.double()
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    # and the quantization itself is close to the float layer
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert rel < (0.02 if bits == 8 else 0.2)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_act_order_with_smooth_matches_the_float_layer(tmp_path, act_order):
    # smooth is stored in the original feature order; forward and dequantize() divided by it after the
    # act-order gather / before undoing it, which scrambled every layer with both (rel. error 2.0)
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    x = torch.randn(300, 128) * (torch.rand(128) * 5)
    s = torch.rand(128) * 3 + 0.2
    m = QuantLinear.from_float(lin, bits=4, group_size=32, method="gptq", calibration=x, smooth=s,
                               act_order=act_order)
    assert (m.perm is not None) == act_order and torch.equal(m.smooth, s)
    with torch.no_grad():
        y, want = m(x), lin(x)
        assert ((y - want).norm() / want.norm()).item() < 0.2
        w = m.dequantize()
        assert ((w - lin.weight).norm() / lin.weight.norm()).item() < 0.35
        torch.testing.assert_close(y.double(), x.double() @ w.double().t() + lin.bias.double(), rtol=1e-5,
                                   atol=1e-4)
        torch.testing.assert_close(m.weight, w)
        # the same through save_quantized / load_quantized (smooth and perm round-trip as stored)
        path = str(tmp_path / "q.safetensors")
        thrifty.quant.save_quantized(nn.Sequential(m), path)
        m2 = thrifty.quant.load_quantized(nn.Sequential(nn.Linear(128, 32)), path)[0]
        assert torch.equal(m2(x), y) and torch.equal(m2.dequantize(), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_w8a8_quantlinear_backward_straight_through(dtype, smooth):
    """The int8 ops have no autograd: QuantLinear(act_bits=8) passes the gradient straight through the
    activation rounding, grad_x = grad_y @ W as W8A16 does (W: its dequantized weight, float64 here)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    s = torch.rand(96) + 0.5 if smooth else None
    m = QuantLinear.from_float(lin, bits=8, act_bits=8, smooth=s)
    m.bias.requires_grad_()
    x = torch.randn(3, 5, 96).to(dtype).requires_grad_()
    y = m(x)
    with torch.no_grad():  # the forward is the same W8A8 computation with or without autograd
        assert torch.equal(y, m(x))
    gy = torch.randn(3, 5, 40).to(dtype)
    y.backward(gy)
    ref = gy.double() @ m.dequantize().double()  # smoothing folded back: the chain rule through x / s
    low = (gy.float() @ m.dequantize()).to(dtype)
    assert x.grad.dtype == dtype
    # with smoothing, autograd's x / s in x's dtype rounds the gradient a second time
    assert_close_to_ref(x.grad, ref, low, factor=4.0 if smooth else 2.0, atol=1e-5 * max(1.0, ref.abs().max().item()))
    torch.testing.assert_close(m.bias.grad.double(), gy.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert m.qweight.grad is None


def test_w8a8_finetunes_a_layer_below_it():
    # a float layer under a W8A8 one gets gradients (it got none: int8_linear only warned)
    torch.manual_seed(0)
    first, top = nn.Linear(32, 64), QuantLinear.from_float(nn.Linear(64, 16), bits=8, act_bits=8)
    x = torch.randn(8, 32)
    top(first(x)).square().sum().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    g = torch.compile(lambda t: top(t).sum(), fullgraph=True, backend="aot_eager")
    t = torch.randn(4, 64, requires_grad=True)
    g(t).backward()
    torch.testing.assert_close(t.grad, torch.ones(4, 16) @ top.dequantize())


def test_quantlinear_bf16_input_and_module_api():
    lin = nn.Linear(256, 40, bias=False)
    m = QuantLinear.from_float(lin, bits=4, group_size=128)
    y = m(torch.randn(2, 256).bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 40)
    assert "bits=4" in repr(m)
    with pytest.raises(ValueError, match="needs calibration"):
        QuantLinear.from_float(lin, bits=4, method="gptq")
    with pytest.raises(ValueError, match="act_bits=8"):
        QuantLinear.from_float(lin, bits=4, act_bits=8)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        QuantLinear.from_float(nn.Linear(100, 8), bits=4, group_size=32)


# ---------------- importers ----------------
def gptq_pack_reference(q_kn, zeros_minus1, scales):
    """GPTQ/AutoGPTQ packing written out plainly: qweight[i, n] holds q[8i + j, n] at bits 4j;
    qzeros[g, c] holds (zero - 1) of column 8c + j at bits 4j."""
    k, n = q_kn.shape
    qw = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qw |= q_kn[j::8].long() << (4 * j)
    qz = torch.zeros(zeros_minus1.shape[0], n // 8, dtype=torch.int64)
    for j in range(8):
        qz |= zeros_minus1[:, j::8].long() << (4 * j)
    to32 = lambda t: (t - ((t >> 31) << 32)).to(torch.int32)  # noqa: E731
    return to32(qw), to32(qz), scales.half()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("g", [32, 128])
def test_gptq_import_roundtrip(act_order, g):
    k, n = 256, 24
    ng = k // g
    q = torch.randint(0, 16, (k, n))
    zm1 = torch.randint(0, 16, (ng, n))
    zm1[0, :8] = 15  # stored 15 -> zero point 16
    scales = torch.rand(ng, n) * 0.1 + 0.01
    qweight, qzeros, sc = gptq_pack_reference(q, zm1, scales)
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k)].int()
    # vLLM / exllama reading: w[n, k] = (q - (stored + 1)) * s, all in float32
    ref = ((q.float() - (zm1[g_idx.long()] + 1).float()) * sc.float()[g_idx.long()]).t()
    bias = torch.randn(n)
    m = QuantLinear.from_gptq(qweight, qzeros, sc, g_idx if act_order else None, bias=bias)
    assert torch.equal(m.dequantize(), ref)
    assert torch.equal(qf.gptq_dequantize_reference(qweight, qzeros, sc, g_idx), ref)
    assert m.group_size == g and (m.perm is not None) == act_order
    x = torch.randn(5, k)
    torch.testing.assert_close(m(x).double(), x.double() @ ref.double().t() + bias.double(), rtol=1e-5, atol=1e-5)


def test_awq_import_roundtrip():
    k, n, g = 256, 32, 64
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // g, n))
    scales = (torch.rand(k // g, n) * 0.1 + 0.01).half()
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's WQLinear_GEMM.from_linear packing

    def awq_pack(t):
        out = torch.zeros(t.shape[0], t.shape[1] // 8, dtype=torch.int64)
        for col in range(t.shape[1] // 8):
            for i in range(8):
                out[:, col] |= t[:, col * 8 + order_map[i]].long() << (i * 4)
        return (out - ((out >> 31) << 32)).to(torch.int32)

    qweight, qzeros = awq_pack(q), awq_pack(z)
    ref = ((q.float() - z.repeat_interleave(g, 0).float()) * scales.float().repeat_interleave(g, 0)).t()
    m = QuantLinear.from_awq(qweight, qzeros, scales, group_size=g)
    assert torch.equal(m.dequantize(), ref)
    assert torch.equal(qf.awq_dequantize_reference(qweight, qzeros, scales), ref)
    with pytest.raises(ValueError, match="does not match the shapes"):
        QuantLinear.from_awq(qweight, qzeros, scales, group_size=128)


def test_awq_group_size_minus_one_is_one_group_of_k():
    """AutoAWQ's q_group_size -1 (WQLinear_GEMM: group_size = in_features): one group of all K inputs."""
    k, n = 128, 16
    q, z = torch.randint(0, 16, (k, n)), torch.randint(0, 16, (1, n))
    s = torch.rand(1, n) + 0.1
    qw, qz, sc = qf.to_awq_tensors(q, z, s)
    m = QuantLinear.from_awq(qw, qz, sc, group_size=-1)
    assert m.group_size == k
    assert torch.equal(m.dequantize(), ((q.float() - z.float()) * sc.float()).t())


def test_gptq_awq_writers_roundtrip():
    k, n, g = 128, 16, 32
    q = torch.randint(0, 16, (k, n))
    z1 = torch.randint(1, 17, (k // g, n))
    s = torch.rand(k // g, n) + 0.1
    qw, qz, sc = qf.to_gptq_tensors(q, z1, s)
    assert torch.equal(QuantLinear.from_gptq(qw, qz, sc).dequantize(),
                       ((q.float() - z1.float().repeat_interleave(g, 0)) * sc.float().repeat_interleave(g, 0)).t())
    z = torch.randint(0, 16, (k // g, n))
    qw, qz, sc = qf.to_awq_tensors(q, z, s)
    assert torch.equal(QuantLinear.from_awq(qw, qz, sc, group_size=g).dequantize(),
                       ((q.float() - z.float().repeat_interleave(g, 0)) * sc.float().repeat_interleave(g, 0)).t())


# well-formed (K=128, N=16, group 32) GPTQ and AWQ tensors for the bad-argument cases below
_GPTQ = qf.to_gptq_tensors(torch.randint(0, 16, (128, 16)), torch.randint(1, 17, (4, 16)), torch.rand(4, 16) + 0.1)
_AWQ = qf.to_awq_tensors(torch.randint(0, 16, (128, 16)), torch.randint(0, 16, (4, 16)), torch.rand(4, 16) + 0.1)
IMPORT_BAD = [
    (lambda: QuantLinear.from_gptq(torch.zeros(16, 8, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, 8)), TypeError, "qweight must be int32"),
    (lambda: QuantLinear.from_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32),
                                   torch.ones(1, 8)), ValueError, "qzeros must have shape"),
    (lambda: QuantLinear.from_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32),
                                   torch.ones(3, 8)), ValueError, "does not divide K=128"),
    (lambda: QuantLinear.from_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, 9)), ValueError, "scales must have shape"),
    (lambda: QuantLinear.from_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, 8), g_idx=torch.zeros(64, dtype=torch.int32)), ValueError, "g_idx must have shape"),
    (lambda: QuantLinear.from_gptq(torch.zeros(16, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, 8), bits=8), ValueError, "only 4-bit"),
    (lambda: QuantLinear.from_gptq(torch.zeros(2, 8, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, 8)), ValueError, "not a multiple of 32"),
    (lambda: QuantLinear.from_awq(torch.zeros(128, 2, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32),
                                  torch.ones(1, 16, dtype=torch.int8), group_size=128), TypeError, "scales must be float"),
    (lambda: QuantLinear.from_awq(torch.zeros(128, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                                  torch.ones(1, 16), group_size=128), ValueError, "qzeros must have shape"),
    # every argument is checked before the layer is built: torch's copy_ errors name none
    (lambda: QuantLinear.from_gptq(*_GPTQ, bias=torch.zeros(24)), ValueError,
     r"from_gptq: argument 'bias' must have shape \(out_features,\) = \(16,\)"),
    (lambda: QuantLinear.from_gptq(*_GPTQ, bias=torch.zeros(1, 16)), ValueError, r"'bias' must have shape"),
    (lambda: QuantLinear.from_gptq(*_GPTQ, bias=torch.zeros(16, dtype=torch.int64)), TypeError,
     "'bias' must be a floating-point tensor"),
    (lambda: QuantLinear.from_gptq(*_GPTQ, bias=[0.0] * 16), TypeError, "'bias' must be a tensor or None"),
    (lambda: QuantLinear.from_gptq(_GPTQ[0].numpy(), *_GPTQ[1:]), TypeError, "qweight must be a torch.Tensor"),
    (lambda: QuantLinear.from_gptq(*_GPTQ, bits="4"), TypeError, "'bits' must be an int"),
    (lambda: QuantLinear.from_gptq(*_GPTQ, g_idx=torch.zeros(128, dtype=torch.int32, device="meta")), ValueError,
     "g_idx is on the meta device"),
    (lambda: QuantLinear.from_gptq(_GPTQ[0].to("meta"), *_GPTQ[1:]), ValueError, "qweight is on the meta device"),
    (lambda: QuantLinear.from_gptq(_GPTQ[0], _GPTQ[1], _GPTQ[2][:2]), ValueError,
     r"qzeros has 4 groups and scales 2 .*: they must agree"),
    # AutoGPTQ writes ceil(K / G) groups: K=96 at G=64 is two groups of 64 and 32, named as such
    (lambda: QuantLinear.from_gptq(torch.zeros(12, 16, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                                   torch.ones(2, 16).half(), (torch.arange(96) // 64).int()), ValueError,
     r"in_features K=96 is not a multiple of the group size 64 \(from g_idx"),
    (lambda: QuantLinear.from_gptq(torch.zeros(12, 16, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                                   torch.ones(2, 16).half(), (torch.arange(96) % 3 != 0).int()), ValueError,
     r"g_idx must give every group the same number of input features, got \[32, 64\]"),
    (lambda: QuantLinear.from_gptq(torch.zeros(20, 16, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32),
                                   torch.ones(3, 16).half()), ValueError,
     r"scales has 3 groups, which does not divide K=160 .*K must be a multiple of the group size"),
    (lambda: QuantLinear.from_awq(*_AWQ, bias=torch.zeros(24), group_size=32), ValueError,
     r"from_awq: argument 'bias' must have shape \(out_features,\) = \(16,\)"),
    (lambda: QuantLinear.from_awq(*_AWQ, bias=torch.zeros(16, dtype=torch.int32), group_size=32), TypeError,
     "'bias' must be a floating-point tensor"),
    (lambda: QuantLinear.from_awq(*_AWQ, group_size="32"), TypeError, "'group_size' must be an int or None"),
    (lambda: QuantLinear.from_awq(_AWQ[0][:96], *_AWQ[1:], group_size=32), ValueError,
     r"qweight must have K = 128 rows"),
    # K itself not a multiple of group_size: said so, whatever group size the scales' shape implies
    (lambda: QuantLinear.from_awq(_AWQ[0][:80], *_AWQ[1:], group_size=32), ValueError,
     r"from_awq: in_features K=80 .* is not a multiple of group_size=32"),
    (lambda: QuantLinear.from_awq(_AWQ[0][:90], *_AWQ[1:], group_size=32), ValueError,
     r"in_features K=90 .* is not a multiple of group_size=32"),
    (lambda: QuantLinear.from_awq(*qf.to_awq_tensors(torch.randint(0, 16, (96, 16)), torch.randint(0, 16, (2, 16)),
                                                     torch.rand(2, 16) + 0.1), group_size=64), ValueError,
     r"in_features K=96 .* is not a multiple of group_size=64"),
    (lambda: QuantLinear.from_awq(*_AWQ[:2], _AWQ[2][:, :8], group_size=32), ValueError, r"scales must have shape"),
    (lambda: QuantLinear.from_awq(_AWQ[0], _AWQ[1][:, :1], _AWQ[2], group_size=32), ValueError,
     r"qzeros must have shape"),
    (lambda: QuantLinear.from_awq(*_AWQ[:2], _AWQ[2].to("meta"), group_size=32), ValueError,
     "scales is on the meta device"),
    (lambda: QuantLinear.from_awq(*(t.to("meta") for t in _AWQ), group_size=32), ValueError,
     "qweight is on the meta device"),
    (lambda: QuantLinear.from_awq(*_AWQ, group_size=0), ValueError,
     r"group_size must be a positive multiple of 32, -1 \(one group of all K inputs\) or None"),
    (lambda: QuantLinear.from_awq(*_AWQ, group_size=-1), ValueError,
     r"group_size=128 does not match the shapes"),  # -1 is one group of K = 128; the scales hold 4
]


@pytest.mark.parametrize("i", range(len(IMPORT_BAD)))
def test_import_bad_input(i):
    fn, exc, msg = IMPORT_BAD[i]
    with pytest.raises(exc, match=msg):
        fn()


def test_import_with_bias():
    m = QuantLinear.from_gptq(*_GPTQ, bias=torch.arange(16.0).half())
    assert m.bias.dtype == torch.float16 and torch.equal(m.bias.float(), torch.arange(16.0))
    m = QuantLinear.from_awq(*_AWQ, bias=torch.arange(16.0), group_size=None)
    assert torch.equal(m.bias, torch.arange(16.0)) and m.group_size == 32


# ---------------- bad input to the ops ----------------
_qw, _s, _z = rand_w4(8, 64, 32)
_q8, _s8 = rand_w8(8, 64)
_x = torch.randn(2, 64)
OP_BAD = [
    (lambda: thrifty.ops.quant_linear(torch.randn(2, 100), torch.zeros(8, 50, dtype=torch.uint8), torch.ones(8, 3),
                                      torch.zeros(8, 3), bits=4, group_size=32), ValueError,
     "in_features K=100 is not a multiple of group_size=32"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s, _z, bits=4, group_size=48), ValueError, "multiple of 32"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s, _z, bits=3, group_size=32), ValueError, "'bits' must be 4 or 8"),
    (lambda: thrifty.ops.quant_linear(_x, _qw.to(torch.int8), _s, _z, bits=4, group_size=32), TypeError, "'qweight' must have dtype Byte"),
    (lambda: thrifty.ops.quant_linear(_x, _qw[:, :16].contiguous(), _s, _z, bits=4, group_size=32), ValueError, "'qweight' must have size 32"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s[:, :1].contiguous(), _z, bits=4, group_size=32), ValueError, "'scales' must have shape"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s.half(), _z, bits=4, group_size=32), TypeError, "'scales' must have dtype Float"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s, None, bits=4, group_size=32), ValueError, "'zeros' is required"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s, _z[:1], bits=4, group_size=32), ValueError, "'zeros' must have the same shape"),
    (lambda: thrifty.ops.quant_linear(_x.double(), _qw, _s, _z, bits=4, group_size=32), TypeError, "'x' must have dtype"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s, _z, bits=4, group_size=32, bias=torch.ones(9)), ValueError, "'bias' must have size 8"),
    (lambda: thrifty.ops.quant_linear(_x, _qw.t(), _s, _z, bits=4, group_size=32), ValueError, "'qweight' must have size"),
    (lambda: thrifty.ops.quant_linear(_x, _q8, _s8, None, bits=8, group_size=128), ValueError, "per output channel"),
    (lambda: thrifty.ops.quant_linear(_x, _q8, _s8, _z, bits=8, group_size=-1), ValueError, "'zeros' must be None"),
    (lambda: thrifty.ops.quant_linear(_x, _q8.to(torch.uint8), _s8, None, bits=8, group_size=-1), TypeError, "'qweight' must have dtype Char"),
    # x's last dimension against a packed weight that agrees with its scales: x is named, not qweight
    (lambda: thrifty.ops.quant_linear(torch.randn(2, 63), _q8, _s8, None, bits=8, group_size=-1), ValueError,
     r"argument 'x' must have the weight's in_features K=64 in its last dimension .*got shape \(2, 63\)"),
    (lambda: thrifty.ops.quant_linear(torch.randn(2, 100), _qw, _s, _z, bits=4, group_size=32), ValueError,
     r"argument 'x' must have the weight's in_features K=64 .*K = 2 \* qweight.shape\[1\].*got shape \(2, 100\)"),
    (lambda: thrifty.ops.quant_linear(torch.randn(3, 2, 96), _qw, _s, _z, bits=4, group_size=32), ValueError,
     r"argument 'x' must have the weight's in_features K=64"),
    (lambda: thrifty.ops.quant_linear([0.0] * 64, _q8, _s8, None, bits=8, group_size=-1), TypeError,
     "argument 'x' must be a tensor"),
    (lambda: thrifty.ops.quant_linear(_x, _qw, _s, _z, bits=4, group_size=None), TypeError,
     "argument 'group_size' must be an int for bits=4"),
    (lambda: thrifty.ops.quant_linear(_x, _q8, _s8, None, bits="8", group_size=-1), TypeError,
     "argument 'bits' must be an int"),
    (lambda: thrifty.ops.quant_linear(_x, _q8, _s8, None, bits=8, group_size=32.0), TypeError,
     "argument 'group_size' must be an int"),
    (lambda: thrifty.ops.int8_linear(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2), _q8, _s8[:3]), ValueError, "'w_scales' must have shape"),
    (lambda: thrifty.ops.int8_linear(torch.zeros(2, 64, dtype=torch.int8), torch.ones(3), _q8, _s8), ValueError, "'x_scales' must have one value per row"),
    (lambda: thrifty.ops.int8_linear(torch.zeros(2, 64), torch.ones(2), _q8, _s8), TypeError, "'xq' must have dtype Char"),
    (lambda: thrifty.ops.int8_linear(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2).half(), _q8, _s8), TypeError, "'x_scales' must have dtype Float"),
    (lambda: thrifty.ops.int8_linear(torch.zeros(2, 63, dtype=torch.int8), torch.ones(2), _q8, _s8), ValueError,
     r"argument 'xq' must have the weight's in_features K=64"),
    (lambda: thrifty.ops.int8_linear(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2), _q8, _s8, out_dtype=torch.int32), TypeError, "'out_dtype'"),
    (lambda: thrifty.ops.quantize_per_token(torch.zeros(2, 3, dtype=torch.int32)), TypeError, "'x' must have dtype"),
]


@pytest.mark.parametrize("i", range(len(OP_BAD)))
def test_op_bad_input(i):
    fn, exc, msg = OP_BAD[i]
    with pytest.raises(exc, match=msg):
        fn()


def test_quant_linear_group_size_none_for_bits8():
    # bits=8 is per output channel: None means no groups, as -1 does
    torch.testing.assert_close(thrifty.ops.quant_linear(_x, _q8, _s8, None, bits=8, group_size=None),
                               thrifty.ops.quant_linear(_x, _q8, _s8, None, bits=8, group_size=-1), rtol=0, atol=0)


# ---------------- GPTQ vs RTN and whole models ----------------
class TinyLM(nn.Module):
    """A small decoder: embedding, 2 pre-norm blocks (attention q/k/v/o, MLP up/down), LM head."""

    def __init__(self, vocab=96, d=128, heads=4, ff=256, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.heads = heads
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            b.q_proj, b.k_proj, b.v_proj, b.o_proj = (nn.Linear(d, d) for _ in range(4))
            b.up_proj, b.down_proj = nn.Linear(d, ff), nn.Linear(ff, d)
            self.blocks.append(b)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        bsz, t, d = h.shape
        for b in self.blocks:
            x = b.norm1(h)
            q, k, v = (p(x).view(bsz, t, self.heads, -1).transpose(1, 2) for p in (b.q_proj, b.k_proj, b.v_proj))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(bsz, t, d)
            h = h + b.o_proj(a)
            h = h + b.down_proj(F.gelu(b.up_proj(b.norm2(h))))
        return self.lm_head(h)


def _tiny_model():
    torch.manual_seed(0)
    m = TinyLM()
    with torch.no_grad():  # correlated embedding features (as trained models have): low rank + noise
        m.embed.weight.copy_(torch.randn(96, 8) @ torch.randn(8, 128) * 0.5 + 0.1 * torch.randn(96, 128))
    return m.eval()


def test_gptq_beats_rtn_on_small_transformer():
    calib = torch.randint(0, 96, (8, 64))
    test = torch.randint(0, 96, (4, 64))
    ref = _tiny_model()(test)
    errs = {}
    for method in ("rtn", "gptq"):
        m = thrifty.quant.quantize_model(_tiny_model(), {"bits": 4, "group_size": 32, "method": method}, calibration=calib)
        assert isinstance(m.blocks[0].q_proj, QuantLinear) and isinstance(m.lm_head, nn.Linear)
        with torch.no_grad():
            errs[method] = ((m(test) - ref).norm() / ref.norm()).item()
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


@pytest.mark.parametrize("cfg", [{"bits": 4, "group_size": 64}, {"bits": 8}, {"bits": 8, "act_bits": 8},
                                 {"bits": 4, "group_size": 32, "method": "gptq"}])
def test_quantize_model_save_load(tmp_path, cfg):
    calib = torch.randint(0, 96, (2, 32))
    m = thrifty.quant.quantize_model(_tiny_model(), cfg, calibration=calib)
    path = str(tmp_path / "q.safetensors")
    thrifty.quant.save_quantized(m, path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "thrifty-quant" and meta["format_version"] == "1"
    assert "blocks.0.q_proj" in json.loads(meta["layers"])
    m2 = thrifty.quant.load_quantized(_tiny_model(), path)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_quantize_model_skip_and_bad_config():
    m = thrifty.quant.quantize_model(_tiny_model(), {"bits": 8, "skip": ["lm_head", "down_proj"]})
    assert isinstance(m.blocks[1].down_proj, nn.Linear) and isinstance(m.blocks[1].up_proj, QuantLinear)
    with pytest.raises(ValueError, match="unknown config keys"):
        thrifty.quant.quantize_model(_tiny_model(), {"bitz": 4})
    with pytest.raises(ValueError, match="needs calibration"):
        thrifty.quant.quantize_model(_tiny_model(), {"method": "gptq"})


@pytest.mark.parametrize("cfg", [{"bits": 8}, {"bits": 4, "group_size": 32}, {"bits": 8, "act_bits": 8},
                                 {"bits": 4, "group_size": 32, "method": "gptq"}])
@pytest.mark.parametrize("train", [True, False])
def test_quantize_model_torch_transformer_encoder_layer(cfg, train):
    """PyTorch's attention reads out_proj.weight directly (kept float: NonDynamicallyQuantizableLinear)
    and TransformerEncoderLayer's eval fast path reads linear1/linear2.weight (QuantLinear.weight)."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).train(train)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        ref = layer(x)
    deq = copy.deepcopy(layer)
    keys = set(layer.state_dict())
    thrifty.quant.quantize_model(layer, cfg, calibration=torch.randn(4, 16, 64))
    assert type(layer.self_attn.out_proj) is NonDynamicallyQuantizableLinear
    assert isinstance(layer.linear1, QuantLinear) and isinstance(layer.linear2, QuantLinear)
    # state_dict: the float weights of linear1/2 became the packed buffers; no 'weight' entry for them
    q_keys = {f"{n}.{b}" for n in ("linear1", "linear2") for b in ("qweight", "scales", "zeros", "perm")}
    assert set(layer.state_dict()) - q_keys == keys - {"linear1.weight", "linear2.weight"}
    assert not any(k.endswith(".weight") for k in layer.linear1.state_dict())
    with torch.no_grad():
        y = layer(x)
        # the float layer with the dequantized weights computes the quantized model's numbers
        for n in ("linear1", "linear2"):
            deq.get_submodule(n).weight.copy_(layer.get_submodule(n).dequantize())
        yd = deq(x)
    if not (train and cfg.get("act_bits") == 8):  # W8A8's forward also rounds activations
        torch.testing.assert_close(y, yd, rtol=1e-4, atol=1e-4)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (0.01 if cfg["bits"] == 8 else 0.05), rel


def test_quantlinear_weight_property():
    lin = nn.Linear(64, 24)
    m = QuantLinear.from_float(lin, bits=4, group_size=32)
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight, m.dequantize())
    assert "weight" not in m.state_dict() and not any(n == "weight" for n, _ in m.named_parameters())
    with pytest.raises(AttributeError):
        m.weight = torch.zeros(24, 64)
    m.bfloat16()  # follows the module's dtype as a float weight would; the packed format stays
    assert m.weight.dtype == torch.bfloat16 and m.scales.dtype == torch.float32
    assert torch.equal(m.weight, m.dequantize().bfloat16())
    m.float()
    assert m.weight.dtype == torch.float32
    assert QuantLinear.from_float(lin.half(), bits=8).weight.dtype == torch.float16
    # and saved / loaded models get it back from the float architecture
    assert set(m.state_dict()) == {"qweight", "scales", "zeros", "bias"}


def test_smoothquant_fold_keeps_float_model_and_helps_w8a8():
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(128), nn.Linear(128, 64)
    with torch.no_grad():
        norm.weight.copy_(torch.ones(128))
        norm.weight[:4] = 30.0  # activation outlier channels
    x = torch.randn(64, 128)
    y = lin(norm(x))
    plain = QuantLinear.from_float(lin, bits=8, act_bits=8)
    err_plain = ((plain(norm(x)) - y).norm() / y.norm()).item()
    amax = norm(x).abs().amax(0)
    thrifty.quant.smooth_fold(norm, [lin], amax, alpha=0.5)
    torch.testing.assert_close(lin(norm(x)), y, rtol=1e-4, atol=1e-4)  # float model unchanged
    smooth = QuantLinear.from_float(lin, bits=8, act_bits=8)
    err_smooth = ((smooth(norm(x)) - y).norm() / y.norm()).item()
    assert err_smooth < err_plain


def test_cli_rtn_on_safetensors_dir(tmp_path):
    from safetensors.torch import load_file, save_file

    from thrifty.quant import cli
    src, out = tmp_path / "m", tmp_path / "q"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    w = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64).bfloat16(),
         "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128).bfloat16(),
         "model.embed_tokens.weight": torch.randn(10, 64).bfloat16(),
         "lm_head.weight": torch.randn(10, 64).bfloat16(),
         "model.norm.weight": torch.ones(64).bfloat16()}
    save_file(w, str(src / "model.safetensors"))
    import argparse
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    assert cli.main(p.parse_args([str(src), str(out), "--bits", "4", "--group-size", "32", "--method", "rtn"])) == 0
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 32)
    assert "lm_head.weight" in t and "model.embed_tokens.weight" in t and "model.norm.weight" in t
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "thrifty" and cfg["quantization_config"]["bits"] == 4
    deq = thrifty.ops.dequantize(t["model.layers.0.mlp.down_proj.qweight"], t["model.layers.0.mlp.down_proj.scales"],
                                 t["model.layers.0.mlp.down_proj.zeros"], bits=4, group_size=32)
    ref = w["model.layers.0.mlp.down_proj.weight"].float()
    assert (deq - ref).norm() / ref.norm() < 0.15


def test_cli_gptq_via_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from thrifty.quant import cli
    src, out = tmp_path / "m", tmp_path / "q"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([cli.DEFAULT_CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    cfg = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(src))
    fast.save_pretrained(str(src))
    import argparse
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args([str(src), str(out), "--bits", "4", "--group-size", "32", "--method", "gptq",
                         "--calibration-tokens", "256", "--seq-len", "128"])
    assert cli.main(args) == 0
    meta = thrifty.quant.model.read_metadata(str(out / "model.safetensors"))
    layers = json.loads(meta["layers"])
    assert "model.layers.0.mlp.down_proj" in layers and layers["model.layers.0.mlp.down_proj"]["act_order"]
    assert (out / "tokenizer.json").exists()


def test_cli_gptq_on_hf_dir_without_tokenizer(tmp_path, capsys):
    # LlamaForCausalLM(cfg).save_pretrained(d) writes no tokenizer: GPTQ calibrates on seeded random
    # token ids from the vocabulary and says so; a --calibration text file still needs a tokenizer
    transformers = pytest.importorskip("transformers")
    import argparse

    from safetensors.torch import load_file

    from thrifty.quant import cli
    src = tmp_path / "m"
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(src))
    assert not any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    base = ["--bits", "4", "--group-size", "128", "--method", "gptq", "--calibration-tokens", "128", "--seq-len", "64"]
    outs = []
    for out in ("q", "q2"):
        assert cli.main(p.parse_args([str(src), str(tmp_path / out), *base])) == 0
        assert "random token ids" in capsys.readouterr().err
        outs.append(load_file(str(tmp_path / out / "model.safetensors")))
    layers = json.loads(thrifty.quant.model.read_metadata(str(tmp_path / "q" / "model.safetensors"))["layers"])
    assert len(layers) == 7 and all(v["act_order"] and v["group_size"] == 128 for v in layers.values())
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])  # seeded
    (tmp_path / "cal.txt").write_text(cli.DEFAULT_CORPUS)
    assert cli.main(p.parse_args([str(src), str(tmp_path / "q3"), *base, "--calibration",
                                  str(tmp_path / "cal.txt")])) == 2
    assert re.search("--calibration .* needs a tokenizer", capsys.readouterr().err)
    assert not (tmp_path / "q3").exists()


def test_perplexity_table_on_a_trained_micro_llama(tmp_path):
    """bench.quant.perplexity_rows end to end, small enough for the suite: trains a micro Llama on a slice
    of the default corpus, quantizes it per format and method, measures held-out perplexity."""
    from thrifty.bench.quant import PPL_FORMATS, format_perplexity_table, perplexity_rows

    threads = torch.get_num_threads()
    rows, info = perplexity_rows(
        steps=30, lr=3e-3, warmup=3, seq_len=64, vocab_size=512, eval_rows=32, calib_rows=8,
        model_overrides=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2),
        default_corpus_caps=dict(max_files=30, max_bytes=200_000),
        formats=PPL_FORMATS + (("W4A16 g256", dict(bits=4, group_size=256)),), out=str(tmp_path / "run"),
        log=lambda msg: None)
    assert torch.get_num_threads() == threads  # restored
    assert [(r["format"], r["method"]) for r in rows] == [("float32", "-")] + [
        (f, m) for f in ("W8A16", "W8A8", "W4A16 g128", "W4A16 g32", "W4A16 g256") for m in ("rtn", "gptq")]
    assert info["eval_tokens"] == 32 * 64 and info["calib_tokens"] == 8 * 64 and info["hidden_size"] == 128
    fl = rows[0]["ppl"]
    assert fl < 0.6 * 512, fl  # trained: well below the uniform 512
    by = {(r["format"], r["method"]): r for r in rows}
    for (f, m), r in by.items():
        if f == "W4A16 g256":  # 128 and 256 input features: no 256-wide groups
            assert r["ppl"] is None and "not a multiple of 256" in r["note"]
            continue
        assert r["ppl"] is not None and r["ppl"] > 1 and abs(r["d_ppl"] - (r["ppl"] - fl)) < 1e-9
        bound = 0.5 if f.startswith("W8") else 5.0  # percent
        assert abs(r["d_pct"]) < bound, (f, m, r)
    assert any(r["ppl"] != fl for r in rows[1:] if r["ppl"] is not None)  # the quantized layers really ran
    table = format_perplexity_table(rows, info).splitlines()
    assert table[2] == "| format | method | perplexity | change | change % |" and len(table) == 4 + len(rows)
    assert table[4].startswith("| float32 | - |") and "n/a" in table[-1]


def test_quantize_model_twice_and_resave_keep_the_config(tmp_path):
    """quantize_model on a quantized model replaced nothing, said nothing and recorded the second config (a
    4-bit model saved as bits 8); a quantized checkpoint loaded and saved again lost bits / group_size /
    method / act_bits from its quantization_config."""
    import json
    from thrifty.models import Llama, LlamaConfig
    from thrifty.quant import quantize_model
    m = Llama(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)).init_weights()
    quantize_model(m, {"bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match="quantized already"):
        quantize_model(m, {"bits": 8})
    m.save_pretrained(tmp_path / "a")
    Llama.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    qa, qb = (json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in "ab")
    assert qa == qb and qa["bits"] == 4 and qa["group_size"] == 32 and qa["method"] == "rtn"
    with pytest.raises(ValueError, match="no nn.Linear layer to quantize outside config 'skip'"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), {"skip": ["0"]})
