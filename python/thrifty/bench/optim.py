"""Fused optimizer benchmark: one optimizer step over many tensors, thrifty vs torch.optim.AdamW
(fused=True and foreach=True) in the same run, with bytes per parameter, GB/s against the
copy bandwidth measured in the same run, and the state memory of each optimizer.

Bytes per parameter per step (each element read once and written once):
  AdamW float32:                 read p g m v (16), write p m v (12)           = 28
  AdamW bf16 params + master:    read g(2) master m v (12), write p(2) master m v (12) = 28
  AdamW8bit float32 params:      read p g (8) + codes (2), write p (4) + codes (2)      = 16 (+ 1/32 for scales)
  AdamW8bit bf16 + master:       read g(2) master(4) codes(2), write p(2) master(4) codes(2) = 16

On CPU each case also records the process CPU time per step of both sides (all threads summed):
on a shared, oversubscribed machine wall-clock ratios follow the CPU share each side happens to
get (torch's fused step, one parallel region per tensor, suffers most from preempted threads),
while CPU time per step does not.
"""
from __future__ import annotations

import gc
import time

import torch

import thrifty
from thrifty.bench.common import Bench


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _cpu_ms(fn, reps: int = 3) -> float:
    """Process CPU milliseconds per call (every thread), after one warm-up call."""
    fn()
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps * 1e3


def _make(n_total: int, n_tensors: int, dtype, device, seed=0):
    per = n_total // n_tensors
    g = torch.Generator(device=device).manual_seed(seed)  # generated on the device: fast for 200M on CUDA
    params, grads = [], []
    for i in range(n_tensors):
        n = per + (i % 7)  # odd sizes
        params.append(torch.nn.Parameter((torch.randn(n, generator=g, device=device) * 0.02).to(dtype)))
        grads.append((torch.randn(n, generator=g, device=device) * 1e-3).to(dtype))
    for p, gr in zip(params, grads):
        p.grad = gr
    return params


def run(device, quick: bool = False) -> Bench:
    device = torch.device(device)
    b = Bench("optim", device, quick=quick)
    if device.type == "cuda":
        n_total, n_tensors = (200_000_000, 100)
    else:
        n_total, n_tensors = (10_000_000, 100) if quick else (50_000_000, 100)
    shape = f"{n_total / 1e6:.0f}M params in {n_tensors} tensors"

    def step_fn(opt):
        return lambda: opt.step()

    def case(**kw):
        c = b.case(**kw)
        if device.type == "cpu":
            c.extra["thrifty_cpu_ms"] = _cpu_ms(kw["thrifty"])
            c.extra["torch_cpu_ms"] = _cpu_ms(kw["torch_fn"])
            print(f"  {'':28s} CPU time per step: thrifty {c.extra['thrifty_cpu_ms']:.1f} ms, "
                  f"{kw['baseline']} {c.extra['torch_cpu_ms']:.1f} ms "
                  f"(x{c.extra['torch_cpu_ms'] / c.extra['thrifty_cpu_ms']:.2f})", flush=True)
        if "state_bytes_per_param" in kw:
            print(f"  {'':28s} state: {kw['state_bytes_per_param']:.2f} B/param"
                  + (f" (torch fused {kw['torch_state_bytes_per_param']:.2f})"
                     if "torch_state_bytes_per_param" in kw else ""), flush=True)
        return c

    # ---- float32 AdamW: thrifty vs torch fused, and vs torch foreach ----
    params = _make(n_total, n_tensors, torch.float32, device)
    n = sum(p.numel() for p in params)
    ours = thrifty.optim.AdamW(params, lr=1e-4, skip_nonfinite=False)
    torch_fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ours.step(), torch_fused.step()
    case(op="AdamW step", shape=shape, dtype="float32", thrifty=step_fn(ours), torch_fn=step_fn(torch_fused),
           bytes=28 * n, baseline="torch fused", bytes_per_param=28,
           state_bytes_per_param=_state_bytes(ours) / n, torch_state_bytes_per_param=_state_bytes(torch_fused) / n)
    del torch_fused
    gc.collect()
    checked = thrifty.optim.AdamW(params, lr=1e-4)  # default: fused inf/nan check (one more read of g)
    checked.step()
    torch_foreach = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    torch_foreach.step()
    case(op="AdamW step +inf check", shape=shape, dtype="float32", thrifty=step_fn(checked),
           torch_fn=step_fn(torch_foreach), bytes=32 * n, baseline="torch foreach", bytes_per_param=32)
    del checked, torch_foreach
    gc.collect()
    torch_fused = torch.optim.AdamW(params, lr=1e-4, fused=True)  # the float32 baseline of the cases below
    torch_fused.step()
    clipped = thrifty.optim.AdamW(params, lr=1e-4, max_grad_norm=1.0)
    clipped.step()
    case(op="AdamW step +clip", shape=shape, dtype="float32", thrifty=step_fn(clipped),
           torch_fn=step_fn(torch_fused), bytes=28 * n, baseline="torch fused (no clip)", bytes_per_param=28)
    del clipped
    gc.collect()
    eight = thrifty.optim.AdamW8bit(params, lr=1e-4, skip_nonfinite=False)
    eight.step()
    case(op="AdamW8bit step", shape=shape, dtype="float32", thrifty=step_fn(eight), torch_fn=step_fn(torch_fused),
           bytes=16 * n, baseline="torch fused fp32", bytes_per_param=16, state_bytes_per_param=_state_bytes(eight) / n)
    del eight
    gc.collect()
    lion = thrifty.optim.Lion(params, lr=1e-5, skip_nonfinite=False)
    lion.step()
    case(op="Lion step", shape=shape, dtype="float32", thrifty=step_fn(lion), torch_fn=step_fn(torch_fused),
           bytes=20 * n, baseline="torch fused AdamW fp32", bytes_per_param=20,
           state_bytes_per_param=_state_bytes(lion) / n)
    del lion, ours
    gc.collect()

    # ---- bfloat16 params + float32 master weights ----
    bparams = _make(n_total, n_tensors, torch.bfloat16, device)
    master = thrifty.optim.AdamW(bparams, lr=1e-4, master_weights=True, skip_nonfinite=False)
    master.step()
    case(op="AdamW bf16+master step", shape=shape, dtype="bfloat16", thrifty=step_fn(master),
           torch_fn=step_fn(torch_fused), bytes=28 * n, baseline="torch fused fp32", bytes_per_param=28,
           state_bytes_per_param=_state_bytes(master) / n)
    del master
    gc.collect()
    eight_m = thrifty.optim.AdamW8bit(bparams, lr=1e-4, master_weights=True, skip_nonfinite=False)
    eight_m.step()
    case(op="AdamW8bit bf16+master step", shape=shape, dtype="bfloat16", thrifty=step_fn(eight_m),
           torch_fn=step_fn(torch_fused), bytes=16 * n, baseline="torch fused fp32", bytes_per_param=16,
           state_bytes_per_param=_state_bytes(eight_m) / n)
    del eight_m, torch_fused, params, bparams
    gc.collect()
    return b
