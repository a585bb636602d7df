"""Quantized GEMM benchmarks: thrifty W4A16 / W8A16 / W8A8 against torch bf16 matmul,
torch._weight_int8pack_mm and torch._weight_int4pack_mm_for_cpu, in the same run, with the
machine's read bandwidth measured in the same run.

CPU weights (K=4096, N=14336) and (K=14336, N=4096) do not fit the L3; M = 1, 8, 64, 256.
GPU: K=N=8192, W4A16 and W8A8 at M = 1, 4, 8, 16, 32, 256 (W8A16 up to 32) against cuBLAS bf16; for M <= 32
also inside CUDA graphs (the kernels without the host's launch cost) with the decode tensor-core kernels
on and switched off (set_cuda_quant_mma), the paths they replaced.
"""
from __future__ import annotations

import torch

import thrifty
from thrifty.bench.common import Bench, best_time
from thrifty.nn import QuantLinear


def measure_read_bandwidth(device, nbytes: int = 512 * 2**20, tries: int = 3) -> float:
    """Bytes/s of a pure streaming read (a max over a tensor far larger than the caches; torch's sum reads
    ~10% slower here): the best of ``tries`` medians, as measure_copy_bandwidth."""
    t = torch.randn(nbytes // 4, device=device)
    return nbytes / best_time(lambda: t.amax(), device, tries)


def _read_share(c, nbytes: float, read_bw: float) -> None:
    """Records (and prints) a weight-streaming row's share of the read bandwidth measured next to it (issue 5's
    M = 1 figure: at least 70%)."""
    c.extra.update(pct_read_bw=100 * nbytes / c.thrifty_s / read_bw, read_bw_GBps=read_bw / 1e9)
    print(f"  {'':28s} {c.gbps:.1f} GB/s of packed weight: {c.extra['pct_read_bw']:.0f}% of the read bandwidth",
          flush=True)


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
    b = Bench("quant", device, matmul_dtype=torch.bfloat16, quick=quick)  # every row multiplies bf16 activations
    torch.manual_seed(0)
    if device.type == "cuda":
        return _run_gpu(b, device, quick)
    shapes = [(4096, 14336)] if quick else [(4096, 14336), (14336, 4096)]
    ms = [1, 8, 64] if quick else [1, 8, 64, 256]
    group = 128
    for k, n in shapes:
        # the read bandwidth next to the cases that stream weights (this box's swings by 2-3x over minutes);
        # the header shows the best of the run
        read_bw = measure_read_bandwidth(device)
        print(f"  read bandwidth {read_bw / 1e9:.1f} GB/s", flush=True)
        b.read_bw = max(b.read_bw or 0.0, read_bw)
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
                _read_share(c, w4_bytes, read_bw)
                c = b.case(op="W8A16 vs torch int8pack", shape=shape, dtype="bfloat16", thrifty=lambda: q8(x),
                           torch_fn=lambda: torch._weight_int8pack_mm(x, t_i8, t_s8), bytes=w8_bytes,
                           baseline="int8pack")
                _read_share(c, w8_bytes, read_bw)
                c = b.case(op="W4A16 vs bf16 matmul", shape=shape, dtype="bfloat16", thrifty=lambda: q4(x),
                           torch_fn=bf16, bytes=w4_bytes, baseline="bf16")
                _read_share(c, w4_bytes, read_bw)
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
    q8 = QuantLinear.from_float(lin, bits=8)
    q8a8 = QuantLinear.from_float(lin, bits=8, act_bits=8)
    w4_bytes = q4.qweight.numel() + 8 * q4.scales.numel()
    graphs = True
    for m in ([1, 16] if quick else [1, 4, 8, 16, 32, 256]):
        x = torch.randn(m, k, device=device).bfloat16()
        bf16 = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        shape = f"M={m} K={k} N={n}"
        ops = [("W4A16", lambda: q4(x), dict(bytes=w4_bytes))]
        if m <= 32:
            ops.append(("W8A16", lambda: q8(x), dict(bytes=q8.qweight.numel() + 4 * n)))
        ops.append(("W8A8", lambda: q8a8(x), dict(flops=2.0 * m * k * n)))
        # Eager rows: what a Python decode loop pays per call. At these sizes the kernels run for less
        # time than the Python and dispatcher work that launches them, so up to 32 rows each op also
        # runs inside CUDA graphs (as serving engines run decode), on thrifty's decode tensor-core
        # kernels and with them switched off (W4: the GEMV up to 8 rows, dequantize + cuBLAS above;
        # W8A8: at::_int_mm on zero-padded rows): those rows time the kernels.
        for name, fn, size in ops:
            b.case(op=f"{name} vs cuBLAS bf16", shape=shape, dtype="bfloat16", thrifty=fn, torch_fn=bf16,
                   baseline="cublas", **size)
        if m > 32 or not graphs:
            continue
        for mma in ("on", "off"):
            prev = thrifty._C.set_cuda_quant_mma(mma)
            try:
                off = " mma off" if mma == "off" else ""
                for name, fn, size in ops:
                    b.case(op=f"{name} vs cuBLAS bf16 (graph{off})", shape=shape, dtype="bfloat16", thrifty=fn,
                           torch_fn=bf16, baseline="cublas", graphed=True, **size)
            except RuntimeError as e:  # a capture failure is a finding to report, not a reason to lose the rest
                print(f"  CUDA graph capture failed ({type(e).__name__}: {e}); eager rows only from here",
                      flush=True)
                graphs = False
            finally:
                thrifty._C.set_cuda_quant_mma(prev)
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


# ---------------- perplexity of a small trained model, per format ----------------
PPL_FORMATS = (("W8A16", dict(bits=8)), ("W8A8", dict(bits=8, act_bits=8)),
               ("W4A16 g128", dict(bits=4, group_size=128)), ("W4A16 g32", dict(bits=4, group_size=32)))


def _heldout_loss(trainer, model, rows: int | None) -> float:
    """Token-weighted mean loss of ``model`` over the first ``rows`` held-out rows (None: all of them;
    else a multiple of the batch size), through Trainer.evaluate (validation documents: never trained on)."""
    n = len(trainer.data.val) if rows is None else min(rows, len(trainer.data.val))
    return trainer.evaluate(model, batches=-(-n // trainer.global_batch))["val_loss"]  # evaluate counts global batches


def perplexity_rows(steps: int = 400, preset: str = "tiny", model_overrides: dict | None = None,
                    seq_len: int = 128, batch_size: int = 8, lr: float = 2e-3, warmup: int = 20,
                    vocab_size: int = 8192, default_corpus_caps: dict | None = None, eval_rows: int | None = 160,
                    calib_rows: int = 32, methods=("rtn", "gptq"), formats=PPL_FORMATS, seed: int = 0,
                    threads: int | None = 1, out: str | None = None, log=None) -> tuple[list[dict], dict]:
    """Trains a small Llama with thrifty's Trainer on its default corpus (the embedded standard-library
    sources unless ``default_corpus_caps`` narrows it), then measures held-out perplexity of the float
    model and of every (format, method) of ``quantize_model`` (GPTQ calibrated on ``calib_rows`` training
    rows, spread evenly over the training split) on the first ``eval_rows`` rows of the validation split
    (None: all of it). Deterministic for a given seed and ``threads`` (torch threads for the run, restored
    after; 1 by default: the same numbers whatever the machine's thread count, and no OpenMP barrier
    stalls on a shared box; None leaves torch's setting).

    Returns (rows, info): rows are dicts format, method, ppl, loss, d_ppl, d_pct (the float model first,
    method "-"); a format whose group size does not divide some layer's in_features gets ppl None and a
    ``note``. info describes the run (model size, steps, token counts, seconds).
    """
    import copy
    import math
    import sys
    import tempfile
    import time

    from thrifty.quant import quantize_model
    from thrifty.train import TrainConfig, Trainer

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tmp, old_threads = None, torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="thrifty-ppl-")
        out = tmp.name
    try:
        cfg = TrainConfig(preset=preset, model_overrides=model_overrides, steps=steps, seq_len=seq_len,
                          batch_size=batch_size, lr=lr, warmup=warmup, vocab_size=vocab_size,
                          default_corpus_caps=default_corpus_caps, eval_every=steps, seed=seed, precision="fp32",
                          progress=False, plot=False, keep_last=1, out=str(out), device="cpu")
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        model = trainer.raw_model.eval()
        ds_train, ds_val = trainer.data.train, trainer.data.val
        n_eval = len(ds_val)
        if eval_rows is not None and eval_rows < n_eval:  # whole batches (Trainer.evaluate reads batch_size rows)
            n_eval = max(min(batch_size, n_eval), eval_rows // batch_size * batch_size)
        k = max(1, min(calib_rows, len(ds_train)))
        idx = sorted({i * (len(ds_train) - 1) // max(1, k - 1) for i in range(k)})
        calib = [ds_train.batch([i]) for i in idx]

        def calibrate(m):
            for b in calib:
                trainer._forward_loss(b, m)

        t1 = time.perf_counter()
        float_loss = _heldout_loss(trainer, model, n_eval)
        float_ppl = math.exp(float_loss)
        rows = [dict(format="float32", method="-", loss=float_loss, ppl=float_ppl, d_ppl=0.0, d_pct=0.0)]
        say(f"perplexity: float32 {float_ppl:.3f} on {n_eval * ds_val.seq_len} held-out tokens")
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
        for name, fmt in formats:
            g = fmt.get("group_size") if fmt.get("bits") == 4 else None
            bad = sorted({m.in_features for m in linears if g and m.in_features % g})
            for method in methods:
                row = dict(format=name, method=method, loss=None, ppl=None, d_ppl=None, d_pct=None)
                if bad:
                    row["note"] = f"in_features {bad} not a multiple of {g}"
                else:
                    torch.manual_seed(seed)
                    qm = quantize_model(copy.deepcopy(model), {**fmt, "method": method},
                                        calibration=calibrate if method == "gptq" else None)
                    loss = _heldout_loss(trainer, qm, n_eval)
                    ppl = math.exp(loss)
                    row.update(loss=loss, ppl=ppl, d_ppl=ppl - float_ppl, d_pct=100 * (ppl / float_ppl - 1))
                    del qm
                rows.append(row)
                say(f"perplexity: {name} {method}: " + (f"{row['ppl']:.3f}" if row["ppl"] else row["note"]))
        mc = trainer.model_config
        info = dict(preset=preset, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                    layers=mc.num_hidden_layers, vocab=mc.vocab_size, params=trainer.n_params, steps=steps,
                    batch_size=batch_size, seq_len=seq_len, train_tokens_seen=steps * batch_size * seq_len,
                    train_split_tokens=ds_train.num_tokens, eval_tokens=n_eval * ds_val.seq_len,
                    calib_tokens=len(idx) * seq_len, tied=bool(getattr(mc, "tie_word_embeddings", False)),
                    seed=seed, corpus_caps=default_corpus_caps, train_s=train_s, eval_s=time.perf_counter() - t1)
        return rows, info
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()


def format_perplexity_table(rows: list[dict], info: dict) -> str:
    """Markdown: a one-paragraph description of the run, then | format | method | perplexity | change |."""
    head = (f"`{info['preset']}` Llama ({info['params'] / 1e6:.1f}M parameters: {info['layers']} layers x "
            f"{info['hidden_size']}, MLP {info['intermediate_size']}, vocab {info['vocab']}"
            f"{', tied embeddings' if info['tied'] else ''}) trained {info['steps']} steps x {info['batch_size']} x "
            f"{info['seq_len']} tokens (float32, seed {info['seed']}) with thrifty.train.Trainer on its default "
            f"corpus{' ' + str(info['corpus_caps']) if info.get('corpus_caps') else ''}; perplexity on "
            f"{info['eval_tokens']} held-out tokens (validation documents). quantize_model "
            f"replaces every linear except the LM head (the embedding and LM head stay float); GPTQ "
            f"(act-order, damp 0.01) is calibrated on {info['calib_tokens']} training tokens.")
    lines = [head, "", "| format | method | perplexity | change | change % |", "|---|---|---|---|---|"]
    for r in rows:
        if r["ppl"] is None:
            lines.append(f"| {r['format']} | {r['method']} | n/a ({r.get('note', '')}) | - | - |")
        elif r["method"] == "-":
            lines.append(f"| {r['format']} | - | {r['ppl']:.3f} | - | - |")
        else:
            lines.append(f"| {r['format']} | {r['method']} | {r['ppl']:.3f} | {r['d_ppl']:+.3f} | {r['d_pct']:+.3f}% |")
    return "\n".join(lines)


def perplexity_table(**kwargs) -> str:
    """Held-out perplexity of a small trained Llama, float and per quantized format (RTN and GPTQ), as a
    markdown table; keyword arguments go to perplexity_rows (the defaults train the tiny preset 400 steps:
    about 5 minutes on one core of a 2-core AVX2 EPYC, then about a minute of evaluation).
    Run: python -c "from thrifty.bench.quant import perplexity_table as f; print(f())"
    """
    return format_perplexity_table(*perplexity_rows(**kwargs))
