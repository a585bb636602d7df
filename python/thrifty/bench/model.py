"""Model benchmarks: thrifty.models.Llama vs Hugging Face transformers' LlamaForCausalLM (SDPA
attention) on the same weights, and the fused linear_cross_entropy's peak memory vs torch.

CPU: the `small` preset in bfloat16: a forward+backward training step on batch 8 x 512
(--quick: 2 x 128) and batch-1 greedy decode tokens/s; linear_cross_entropy peak memory on a
CPU-sized case (vocab 32768, 2048 tokens, hidden 1024; the 128k x 8k x 2048 case of the issue
is ~13 TFLOP, too slow for 2 cores), measured as peak RSS growth of a fresh subprocess.
CUDA: the same step and decode, and the 128k vocab x 8k tokens x 2048 hidden loss case with
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from thrifty.bench.common import Bench, Case, sync, timeit


def _models(dtype, device, cfg_name="small"):
    import transformers

    from thrifty.models import Llama, LlamaConfig

    cfg = LlamaConfig.preset(cfg_name)
    torch.manual_seed(0)
    ours = Llama(cfg).init_weights().to(device=device, dtype=dtype)
    hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("extra", "architectures",
                                                                                        "rope_parameters")},
                                    attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hcfg).to(device=device, dtype=dtype)
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    return ours, hf


def _record(b: Bench, op, shape, dtype, t, tt, baseline="transformers", **extra):
    c = Case(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), thrifty_s=t, torch_s=tt,
             speedup=tt / t if tt else None, baseline=baseline, extra=extra)
    b.cases.append(c)
    print(f"  {op:28s} {shape:24s} thrifty {t * 1e3:9.1f} ms  {baseline} {tt * 1e3:9.1f} ms  x{c.speedup:5.2f} "
          f"{extra}", flush=True)


# ---- peak memory, measured in a fresh process ----
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Resets this process's peak RSS (VmHWM; Linux >= 4.0) and returns the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak() -> int:
    """Peak RSS (bytes) since the last reset_peak()."""
    return _status("VmHWM")


_MEM_SCRIPT = r"""
import json, resource, sys, torch, thrifty
import torch.nn.functional as F
kind, T, V, H, dt, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), getattr(torch, sys.argv[5]), sys.argv[6]
torch.manual_seed(0)
h = (torch.randn(T, H, device=dev) * 0.5).to(dt).requires_grad_()
w = (torch.randn(V, H, device=dev) * 0.02).to(dt).requires_grad_()
y = torch.randint(0, V, (T,), device=dev)
from thrifty.bench.model import reset_peak, peak
def step():
    if kind == "thrifty":
        loss = thrifty.ops.linear_cross_entropy(h, w, y)
    else:
        loss = F.cross_entropy(h @ w.T, y)
    loss.backward()
if dev == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(); torch.cuda.synchronize(); p = torch.cuda.max_memory_allocated() - base
else:
    base = reset_peak(); step(); p = peak() - base
print(json.dumps({"peak": p}))
"""


def _peak_mem(kind, T, V, H, dtype, device) -> float:
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, kind, str(T), str(V), str(H),
                          str(dtype).replace("torch.", ""), device.type], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def _peak_step_mem(fn, device) -> float:
    """Peak memory growth of fn(): CUDA allocator peak, or (CPU) peak RSS growth - only meaningful
    when fn's peak is above the process's earlier peak, so the larger-memory model runs last."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return float("nan")


def run(device, quick: bool = False) -> Bench:
    device = torch.device(device)
    b = Bench("model", device)
    dtype = torch.bfloat16
    cuda = device.type == "cuda"

    # 1. linear_cross_entropy peak memory (fresh subprocesses), and its time
    T, V, H, ldt = (8192, 128256, 2048, torch.bfloat16) if cuda else ((512, 32768, 1024, torch.float32) if quick
                                                                       else (2048, 32768, 1024, torch.float32))
    m_ours = _peak_mem("thrifty", T, V, H, ldt, device)
    m_torch = _peak_mem("torch", T, V, H, ldt, device)
    hh = torch.randn(T, H, device=device, dtype=ldt).requires_grad_()
    ww = (torch.randn(V, H, device=device) * 0.02).to(ldt).requires_grad_()
    yy = torch.randint(0, V, (T,), device=device)
    import torch.nn.functional as F

    import thrifty
    t = timeit(lambda: thrifty.ops.linear_cross_entropy(hh, ww, yy).backward(), device, warmup=1, reps=3)
    tt = timeit(lambda: F.cross_entropy(hh @ ww.T, yy).backward(), device, warmup=1, reps=3)
    _record(b, "linear_cross_entropy fwd+bwd", f"T{T} V{V} H{H}", ldt, t, tt, baseline="torch",
            peak_mem_MB=round(m_ours / 2**20), torch_peak_mem_MB=round(m_torch / 2**20),
            mem_ratio=round(m_ours / m_torch, 3))
    del hh, ww, yy

    # 2. training step of the small preset
    ours, hf = _models(dtype, device)
    bs, seq = (2, 128) if quick else (8, 512)
    ids = torch.randint(0, ours.config.vocab_size, (bs, seq), device=device)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(ids, labels=ids).backward()

    def step_hf():
        hf.zero_grad(set_to_none=True)
        hf(ids, labels=ids).loss.backward()

    reps = 3 if not cuda else 10
    mem_o = _peak_step_mem(step_ours, device)
    mem_h = _peak_step_mem(step_hf, device)
    t = timeit(step_ours, device, warmup=1, reps=reps)
    tt = timeit(step_hf, device, warmup=1, reps=reps)
    extra = {"tokens_per_s": round(bs * seq / t), "hf_tokens_per_s": round(bs * seq / tt)}
    if cuda:
        extra.update(peak_mem_MB=round(mem_o / 2**20), hf_peak_mem_MB=round(mem_h / 2**20))
    _record(b, "small train step fwd+bwd", f"{bs}x{seq}", dtype, t, tt, **extra)
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)

    # 3. batch-1 greedy decode
    new = 16 if quick else 64
    prompt = torch.randint(0, ours.config.vocab_size, (1, 16), device=device)
    ours.eval()
    hf.eval()

    def gen_ours():
        return ours.generate(prompt, max_new_tokens=new, eos_token_id=[])

    def gen_hf():
        return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        t = timeit(gen_ours, device, warmup=1, reps=3)
        tt = timeit(gen_hf, device, warmup=1, reps=3)
    _record(b, "small decode batch 1", f"16+{new} tokens", dtype, t, tt, tokens_per_s=round(new / t, 1),
            hf_tokens_per_s=round(new / tt, 1))
    if not cuda:
        # CPU peak memory of a training step: each model in its own fresh process
        for name in ("thrifty", "transformers"):
            mb = _cpu_step_peak(name, bs, seq)
            b.cases[1].extra[("peak_rss_MB" if name == "thrifty" else "hf_peak_rss_MB")] = round(mb / 2**20)
        print(f"  train step peak RSS growth: {b.cases[1].extra}", flush=True)
    return b


_STEP_MEM_SCRIPT = r"""
import json, sys, torch
from thrifty.bench.model import _models, reset_peak, peak
which, bs, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ours, hf = _models(torch.bfloat16, torch.device("cpu"))
m = ours if which == "thrifty" else hf
del ours, hf
ids = torch.randint(0, 32000, (bs, seq))
base = reset_peak()
out = m(ids, labels=ids)
(out if which == "thrifty" else out.loss).backward()
print(json.dumps({"peak": peak() - base}))
"""


def _cpu_step_peak(which, bs, seq) -> float:
    out = subprocess.run([sys.executable, "-c", _STEP_MEM_SCRIPT, which, str(bs), str(seq)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]
