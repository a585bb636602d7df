"""Model benchmarks: thrifty.models.Llama vs Hugging Face transformers' LlamaForCausalLM (SDPA
attention) on the same weights, and the fused linear_cross_entropy's peak memory vs torch.

CPU: the `small` preset in bfloat16: a forward+backward training step on batch 8 x 512
(--quick: the `tiny` preset, 2 x 64), each model in a fresh process that reports the peak RSS
growth of its first step and then times more steps (transformers' bf16 step at 8 x 512 takes tens
of minutes on CPUs without avx512_bf16, so the full run times that one step), and batch-1 greedy
decode tokens/s (always `small`: 16-token prompt + 32 new tokens, thrifty's generate vs
transformers' generate on the same weights), the decode GEMV thrifty.ops.linear vs F.linear in bf16
(M 1: K 768 x N 3072 and 4096 x 4096, weights cycled through more memory than any cache holds) in
GB/s against this run's copy bandwidth; linear_cross_entropy peak memory on a CPU-sized case
(vocab 32768, 2048 tokens, hidden 1024; the 128k x 8k x 2048 case of the issue is ~13 TFLOP, too
slow for 2 cores), measured as peak RSS growth of a fresh subprocess.
CUDA: the same step and decode, and the 128k vocab x 8k tokens x 2048 hidden loss case with
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import torch

from thrifty.bench.common import Bench, Case, timeit


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


def _record(b: Bench, op, shape, dtype, t, tt, baseline="transformers", *, flops=None, bytes=None, **extra):
    """A row timed outside Bench.case (fresh processes, generate loops); flops / bytes give its rates."""
    c = Case(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), thrifty_s=t, torch_s=tt,
             speedup=tt / t if tt else None, flops=flops, bytes=bytes, baseline=baseline, extra=extra)
    b._rates(c)
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


def _cuda_step_peak(fn) -> float:
    """CUDA allocator peak of fn() over what was allocated before it (the CPU step is measured in
    fresh processes instead: _cpu_step)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(device, quick: bool = False) -> Bench:
    device = torch.device(device)
    b = Bench("model", device, quick=quick)
    dtype = torch.bfloat16
    cuda = device.type == "cuda"

    # 1. linear_cross_entropy peak memory (fresh subprocesses), and its time
    T, V, H, ldt = (8192, 128256, 2048, torch.bfloat16) if cuda else ((256, 8192, 512, torch.float32) if quick
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
    # FLOPs: the logits (2 T V H) and the two gradient products (hidden and weight, 2 T V H each)
    _record(b, "linear_cross_entropy fwd+bwd", f"T{T} V{V} H{H}", ldt, t, tt, baseline="torch", flops=6.0 * T * V * H,
            peak_mem_MB=round(m_ours / 2**20), torch_peak_mem_MB=round(m_torch / 2**20),
            mem_ratio=round(m_ours / m_torch, 3))
    del hh, ww, yy

    # 2. training step of the small preset
    preset = "tiny" if quick and not cuda else "small"
    bs, seq = (2, 64) if quick else (8, 512)
    if cuda:
        ours, hf = _models(dtype, device, preset)
        ids = torch.randint(0, ours.config.vocab_size, (bs, seq), device=device)

        def step_ours():
            ours.zero_grad(set_to_none=True)
            ours(ids, labels=ids).backward()

        def step_hf():
            hf.zero_grad(set_to_none=True)
            hf(ids, labels=ids).loss.backward()

        mem_o = _cuda_step_peak(step_ours)
        mem_h = _cuda_step_peak(step_hf)
        t = timeit(step_ours, device, warmup=1, reps=10)
        tt = timeit(step_hf, device, warmup=1, reps=10)
        extra = {"tokens_per_s": round(bs * seq / t), "hf_tokens_per_s": round(bs * seq / tt),
                 "peak_mem_MB": round(mem_o / 2**20), "hf_peak_mem_MB": round(mem_h / 2**20)}
    else:
        # Each model in a fresh process: peak RSS growth of its first step, then the timed steps. transformers'
        # bf16 step at 8 x 512 takes tens of minutes on CPUs without avx512_bf16 (torch's slow bf16 GEMM
        # there), so the full run times it once: its first (measured-memory) step is its timed step.
        r_o = _cpu_step("thrifty", bs, seq, preset, reps=3)
        r_h = _cpu_step("transformers", bs, seq, preset, reps=3 if quick else 0)
        t, tt = statistics.median(r_o["times"]), statistics.median(r_h["times"])
        extra = {"tokens_per_s": round(bs * seq / t, 1), "hf_tokens_per_s": round(bs * seq / tt, 1),
                 "peak_rss_MB": round(r_o["peak"] / 2**20), "hf_peak_rss_MB": round(r_h["peak"] / 2**20),
                 "mem_ratio": round(r_o["peak"] / r_h["peak"], 3), "hf_timed_steps": len(r_h["times"])}
    from thrifty.models import LlamaConfig
    from thrifty.train.trainer import model_flops_per_token

    _record(b, f"{preset} train step fwd+bwd", f"{bs}x{seq}", dtype, t, tt,
            flops=model_flops_per_token(LlamaConfig.preset(preset), seq) * bs * seq, **extra)

    # 3. batch-1 greedy decode: the `small` preset (on the CPU too: thrifty's decode GEMV makes it quick;
    # transformers' bf16 GEMV takes ~1 s per token on the AVX2 box, hence 32 new tokens there)
    if not cuda:  # the CPU step ran in subprocesses (on CUDA the preset is always `small`)
        ours, hf = _models(dtype, device, "small")
    new = 64 if cuda else 32
    prompt = torch.randint(0, ours.config.vocab_size, (1, 16), device=device)
    ours.eval()
    hf.eval()

    def gen_ours(n=new):
        return ours.generate(prompt, max_new_tokens=n, eos_token_id=[])

    def gen_hf(n=new):
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        t = timeit(gen_ours, device, warmup=1, reps=3)
        tt = timeit(gen_hf, device, warmup=1, reps=3)
        # prefill + first token alone, so the steady decode rate (tokens 2..new) is known too
        t1 = timeit(lambda: gen_ours(1), device, warmup=1, reps=3)
        tt1 = timeit(lambda: gen_hf(1), device, warmup=1, reps=3)
        a, h = gen_ours()[0, 16:], gen_hf()[0, 16:]
        same = torch.equal(a, h)
        # where greedy decoding first parts (None: never): late means bf16 near-ties of a random-init model's
        # flat logits, the first tokens would mean a bug
        diff = (a != h).nonzero()
        first_diff = int(diff[0, 0]) if len(diff) else None
    # bytes: every weight read once per new token (the prefill's 16 tokens share one read), the bound of batch-1 decode
    w_bytes = sum(p.numel() * p.element_size() for n_, p in ours.named_parameters() if "embed_tokens" not in n_)
    if ours.config.tie_word_embeddings:
        w_bytes += ours.lm_head.weight.numel() * ours.lm_head.weight.element_size()
    _record(b, "small decode batch 1", f"16+{new} tokens", dtype, t, tt, bytes=float(new * w_bytes), tokens_per_s=round(new / t, 1),
            hf_tokens_per_s=round(new / tt, 1), decode_only_tokens_per_s=round((new - 1) / (t - t1), 1),
            hf_decode_only_tokens_per_s=round((new - 1) / (tt - tt1), 1),
            decode_only_speedup=round((tt - tt1) / (t - t1), 2), same_tokens=same, first_diff=first_diff)
    del ours, hf

    # 4. the decode GEMV alone: y (1, N) = x (1, K) @ W.T in bf16, W cycled through >= 96 MB of copies
    for k, n in ((768, 3072), (4096, 4096)):
        ws = [torch.randn(n, k, device=device).to(dtype) for _ in range(max(2, 96 * 2**20 // (2 * n * k)))]
        x = torch.randn(1, k, device=device).to(dtype)
        it = {"i": 0}

        def nxt():
            it["i"] = (it["i"] + 1) % len(ws)
            return ws[it["i"]]

        b.case(op="linear GEMV (decode)", shape=f"M1 K{k} N{n}", dtype=dtype, bytes=2 * (n * k + k + n),
               thrifty=lambda: thrifty.ops.linear(x, nxt()), torch_fn=lambda: F.linear(x, nxt()),
               baseline="F.linear")
        c = b.cases[-1]
        c.extra["torch_GBps"] = round(c.bytes / c.torch_s / 1e9, 2)
        if b.copy_bw:
            c.extra["torch_pct_copy"] = round(100 * c.bytes / c.torch_s / b.copy_bw)
        print(f"    {c.gbps:.2f} GB/s ({c.pct_roofline:.0f}% of copy {b.copy_bw / 1e9:.2f} GB/s) vs F.linear "
              f"{c.extra['torch_GBps']} GB/s", flush=True)
        del ws

    return b


_STEP_SCRIPT = r"""
import json, sys, time, torch
from thrifty.bench.model import _models, reset_peak, peak
which, bs, seq, preset, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
ours, hf = _models(torch.bfloat16, torch.device("cpu"), preset)
m = ours if which == "thrifty" else hf
del ours, hf
torch.manual_seed(1)
ids = torch.randint(0, m.config.vocab_size, (bs, seq))
def step():
    m.zero_grad(set_to_none=True)
    out = m(ids, labels=ids)
    (out if which == "thrifty" else out.loss).backward()
base = reset_peak()
t0 = time.perf_counter()
step()
first = time.perf_counter() - t0
p = peak() - base
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"peak": p, "times": times or [first]}))
"""


def _cpu_step(which, bs, seq, preset, reps) -> dict:
    """Peak RSS growth of one fwd+bwd step of `which` in a fresh process, and the times of `reps` more
    steps (reps 0: the first step's time)."""
    out = subprocess.run([sys.executable, "-c", _STEP_SCRIPT, which, str(bs), str(seq), preset, str(reps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
