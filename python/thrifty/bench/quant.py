"""Quantized GEMM benchmarks: thrifty W4A16 / W8A16 / W8A8 against torch bf16 matmul,
torch._weight_int8pack_mm and torch._weight_int4pack_mm_for_cpu, in the same run, with the
machine's read bandwidth measured in the same run.

CPU weights (K=4096, N=14336) and (K=14336, N=4096) do not fit the L3; M = 1, 8, 64, 256.
GPU: K=N=8192, M = 1, 16, 256 against cuBLAS bf16 (few cases).
"""
from __future__ import annotations

import torch

import thrifty
from thrifty.bench.common import Bench, timeit
from thrifty.nn import QuantLinear


def measure_read_bandwidth(device, nbytes: int = 512 * 2**20) -> float:
    """Bytes/s of a pure streaming read (a sum over a tensor far larger than the caches)."""
    t = torch.randn(nbytes // 4, device=device)
    s = timeit(lambda: t.sum(), device, warmup=2, min_time=0.5, max_reps=20)
    return nbytes / s


def _torch_int4(w: torch.Tensor, group: int):
    """torch's own CPU int4 path: (packed weight, scales_and_zeros) for _weight_int4pack_mm_for_cpu."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    s = ((wmax - wmin) / 15).clamp(min=1e-6)
    q = torch.clamp(torch.round((wg - wmin[..., None]) / s[..., None]), 0, 15).to(torch.int32).reshape(n, k)
    # torch's convention: w = (q - 8) * s + zero, with zero = wmin + 8 * s
    sz = torch.stack([s, wmin + 8 * s], -1).transpose(0, 1).contiguous().bfloat16()  # (K/G, N, 2)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    return packed, sz


def _layers(k: int, n: int, group: int):
    """One random (n, k) layer and what both sides multiply: the float layer, its bf16 weight,
    thrifty's W4 and W8 QuantLinears, torch's int8pack weight + bf16 scales and int4pack weight +
    scales/zeros."""
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    q4 = QuantLinear.from_float(lin, bits=4, group_size=group)
    q8 = QuantLinear.from_float(lin, bits=8)
    t_i4, t_sz = _torch_int4(lin.weight.detach(), group)
    return lin, lin.weight.detach().bfloat16(), q4, q8, q8.qweight, q8.scales.bfloat16(), t_i4, t_sz


def run(device, quick: bool = False) -> Bench:
    device = torch.device(device)
    b = Bench("quant", device, matmul_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    if device.type == "cuda":
        return _run_gpu(b, device, quick)
    read_bw = measure_read_bandwidth(device)
    print(f"  read bandwidth {read_bw / 1e9:.1f} GB/s", flush=True)
    b.read_bw = read_bw
    shapes = [(4096, 14336)] if quick else [(4096, 14336), (14336, 4096)]
    ms = [1, 8, 64] if quick else [1, 8, 64, 256]
    group = 128
    for k, n in shapes:
        lin, w_bf16, q4, q8, t_i8, t_s8, t_i4, t_sz = _layers(k, n, group)
        q8a8 = QuantLinear.from_float(lin, bits=8, act_bits=8)
        del lin
        w4_bytes = q4.qweight.numel() + 8 * q4.scales.numel()
        w8_bytes = q8.qweight.numel() + 4 * n
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            shape = f"M={m} K={k} N={n}"
            fl = 2.0 * m * k * n
            bf16 = lambda: torch.nn.functional.linear(x, w_bf16)  # noqa: E731
            if m <= 8:
                c = b.case(op="W4A16 vs torch int4pack", shape=shape, dtype="bfloat16", thrifty=lambda: q4(x),
                           torch_fn=lambda: torch._weight_int4pack_mm_for_cpu(x, t_i4, group, t_sz),
                           bytes=w4_bytes, baseline="int4pack")
                c.extra["pct_read_bw"] = 100 * w4_bytes / c.thrifty_s / read_bw
                c = b.case(op="W8A16 vs torch int8pack", shape=shape, dtype="bfloat16", thrifty=lambda: q8(x),
                           torch_fn=lambda: torch._weight_int8pack_mm(x, t_i8, t_s8), bytes=w8_bytes,
                           baseline="int8pack")
                c.extra["pct_read_bw"] = 100 * w8_bytes / c.thrifty_s / read_bw
                b.case(op="W4A16 vs bf16 matmul", shape=shape, dtype="bfloat16", thrifty=lambda: q4(x),
                       torch_fn=bf16, bytes=w4_bytes, baseline="bf16")
            else:
                b.case(op="W8A8 vs bf16 matmul", shape=shape, dtype="bfloat16", thrifty=lambda: q8a8(x),
                       torch_fn=bf16, flops=fl, baseline="bf16")
                b.case(op="W4A16 vs bf16 matmul", shape=shape, dtype="bfloat16", thrifty=lambda: q4(x),
                       torch_fn=bf16, flops=fl, baseline="bf16")
                b.case(op="W8A16 vs bf16 matmul", shape=shape, dtype="bfloat16", thrifty=lambda: q8(x),
                       torch_fn=bf16, flops=fl, baseline="bf16")
                if not quick:
                    b.case(op="torch int4pack vs bf16 (ref)", shape=shape, dtype="bfloat16",
                           thrifty=lambda: torch._weight_int4pack_mm_for_cpu(x, t_i4, group, t_sz),
                           torch_fn=bf16, flops=fl, baseline="bf16")
    return b


def _run_gpu(b: Bench, device, quick: bool) -> Bench:
    k = n = 8192
    lin = torch.nn.Linear(k, n, bias=False, device=device)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    w = lin.weight.detach().bfloat16()
    q4 = QuantLinear.from_float(lin, bits=4, group_size=128)
    q8a8 = QuantLinear.from_float(lin, bits=8, act_bits=8)
    for m in ([1, 16] if quick else [1, 4, 16, 256]):
        x = torch.randn(m, k, device=device).bfloat16()
        bf16 = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        b.case(op="W4A16 vs cuBLAS bf16", shape=f"M={m} K={k} N={n}", dtype="bfloat16", thrifty=lambda: q4(x),
               torch_fn=bf16, bytes=q4.qweight.numel() + 8 * q4.scales.numel(), baseline="cublas")
        if m >= 16:
            b.case(op="W8A8 vs cuBLAS bf16", shape=f"M={m} K={k} N={n}", dtype="bfloat16", thrifty=lambda: q8a8(x),
                   torch_fn=bf16, flops=2.0 * m * k * n, baseline="cublas")
    return b


def accuracy_table() -> str:
    """Output relative error per format on a random layer with correlated inputs (RTN and GPTQ)."""
    torch.manual_seed(0)
    k, n = 1024, 1024
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(2048, 64) @ torch.randn(64, k) * 0.2 + 0.05 * torch.randn(2048, k)
    xc, xt = x[:1024], x[1024:]
    ref = lin(xt).double()
    rows = ["| format | method | output rel. error |", "|---|---|---|"]
    for name, kw in [("W8A16", dict(bits=8)), ("W8A8", dict(bits=8, act_bits=8)), ("W4A16 g128", dict(bits=4)),
                     ("W4A16 g32", dict(bits=4, group_size=32))]:
        for method in ("rtn", "gptq"):
            q = QuantLinear.from_float(lin, method=method, calibration=xc, **kw)
            with torch.no_grad():
                err = ((q(xt).double() - ref).norm() / ref.norm()).item()
            rows.append(f"| {name} | {method} | {err:.4f} |")
    return "\n".join(rows)


def cpu_thread_time(ms=(1, 8), reps: int = 15, shapes=((4096, 14336), (14336, 4096)), group: int = 128) -> list[str]:
    """Single-thread CPU decode comparison that holds up on a busy machine: torch.set_num_threads(1),
    time.thread_time() per call, thrifty and torch's ops interleaved in one process, medians.
    Returns one line per (shape, M) with the ratios to torch int4pack / int8pack (and bf16 for M > 1).
    Bandwidth-bound figures still move with the load; the ratios move less.
    Run: python -c "from thrifty.bench.quant import cpu_thread_time as f; print('\\n'.join(f()))"
    """
    import statistics
    import time

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = []
    try:
        for k, n in shapes:
            lin, wb, q4, q8, t_i8, t_s8, t_i4, t_sz = _layers(k, n, group)
            for m in ms:
                x = torch.randn(m, k).bfloat16()
                fns = {"w4": lambda: q4(x), "int4pack": lambda: torch._weight_int4pack_mm_for_cpu(x, t_i4, group, t_sz),
                       "w8": lambda: q8(x), "int8pack": lambda: torch._weight_int8pack_mm(x, t_i8, t_s8)}
                if m > 1:
                    fns["bf16"] = lambda: torch.nn.functional.linear(x, wb)  # noqa: E731
                for f in fns.values():
                    f()
                ts = {key: [] for key in fns}
                for _ in range(reps):
                    for key, f in fns.items():
                        t0 = time.thread_time()
                        f()
                        ts[key].append(time.thread_time() - t0)
                md = {key: statistics.median(v) for key, v in ts.items()}
                line = f"K={k} N={n} M={m}: " + " ".join(f"{key} {v * 1e3:.2f} ms" for key, v in md.items())
                line += f" | W4A16 {md['int4pack'] / md['w4']:.2f}x int4pack, W8A16 {md['int8pack'] / md['w8']:.2f}x int8pack"
                if m > 1:
                    line += f", W4A16 {md['bf16'] / md['w4']:.2f}x bf16"
                lines.append(line)
    finally:
        torch.set_num_threads(old)
    return lines
