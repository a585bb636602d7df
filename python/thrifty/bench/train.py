"""Training-step benchmark: `thrifty train` (thrifty.train.Trainer.train_step: thrifty.models.Llama on
thrifty ops, packed varlen input, fused linear cross-entropy, fused clipping inside thrifty's
optimizer, lr schedule) against a plain PyTorch + transformers loop (LlamaForCausalLM with SDPA
attention, bf16 params, torch.optim.AdamW(fused=True), no clipping), same model config, initial
weights, batch rows and precision.

Each case runs in a fresh subprocess (peak memory is then not blurred by what an earlier case left
in the allocator) within one invocation; the bf16 and float32 matmul rates are measured in the
parent. Reports training tokens/s, the speedup, MFU against the bf16 matmul rate (the issue's
figure; on CPUs without native bf16 thrifty computes in float32, so its MFU there can pass 100%)
and against the float32 rate, and peak memory (CUDA: max allocated; CPU: peak resident-set growth
over the process after setup and a glibc malloc_trim, sampled every 2 ms: gradients, optimizer
state, activations, temporaries).

Cases (``--cases``): ``default`` (thrifty train's defaults at bf16: AdamW with float32 master
weights), ``lean`` (--optimizer adamw8bit --no-master-weights --activation-checkpointing: bf16
weights updated directly as the baseline does, 8-bit moments, layers recomputed in the backward),
``lean8`` (the same without the recompute; only when named), ``hf`` (the baseline). Full: the
`small` preset, seq 512 (CPU: batch 1; CUDA: batch 16). --quick: the `tiny` preset, 2 x 128.

    python bench/train.py [--quick] [--preset small --batch 1 --seq 512 --reps 2 --hf-reps 1]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from thrifty.bench.common import OUT_HELP, Bench, Case, bench_device, sync

CASES = {
    "default": dict(),
    "lean": dict(optimizer="adamw8bit", master_weights=False, activation_checkpointing=True),
    "lean8": dict(optimizer="adamw8bit", master_weights=False),
}
LABELS = {
    "default": "thrifty train (AdamW, fp32 master weights)",
    "lean": "thrifty train --optimizer adamw8bit --no-master-weights --activation-checkpointing",
    "lean8": "thrifty train --optimizer adamw8bit --no-master-weights",
    "hf": "transformers LlamaForCausalLM (SDPA) + torch.optim.AdamW(fused=True)",
}


def case_list(value: str) -> tuple[str, ...]:
    """argparse type of ``--cases``: comma-separated names from LABELS (else a usage error, exit code 2)."""
    cases = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
    bad = [c for c in cases if c not in LABELS]
    if not cases or bad:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(map(repr, bad)) or '(none given)'}: "
                                         f"choose from {', '.join(LABELS)}")
    return cases


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    """Hands freed heap pages back to the OS (glibc), so memory freed during setup (the float32 model
    before its cast to bf16, a deleted model) cannot be reused by the measured steps without showing
    up as resident-set growth."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory during a block: CUDA max_memory_allocated, or sampled RSS growth on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            self.base = _rss()
            self._stop = False
            self._max = self.base

            def poll():
                while not self._stop:
                    self._max = max(self._max, _rss())
                    time.sleep(0.002)
            self._t = threading.Thread(target=poll, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._t.join()
            self.peak = max(self._max, _rss()) - self.base
        return False


def _time_steps(step, device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return ts


def _configs(device, quick):
    if quick:
        return "tiny", 2, 128
    if torch.device(device).type == "cuda":
        return "small", 16, 512
    return "small", 1, 512


def _trainer(spec: dict, case: str):
    from thrifty.models import LlamaConfig
    from thrifty.train import TrainConfig, Trainer

    vocab = LlamaConfig.preset(spec["preset"]).vocab_size  # the preset's own vocabulary, not the BPE's
    cfg = TrainConfig(preset=spec["preset"], batch_size=spec["batch"], seq_len=spec["seq"], steps=10**6, warmup=10,
                      precision="bf16", progress=False, plot=False, out=spec["run_dir"], device=spec["device"],
                      default_corpus_caps=dict(max_files=40, max_bytes=400_000),
                      model_overrides={"vocab_size": vocab}, **CASES.get(case, {}))
    t = Trainer(cfg)
    t.setup()
    return t


def _worker(spec: dict) -> dict:
    """One case in this (fresh) process: setup, then warm-up + timed steps under PeakMemory."""
    device = torch.device(spec["device"])
    case = spec["case"]
    t = _trainer(spec, case)
    if case != "hf":
        t.model.train()
        last = {}

        def step():
            last.update(t.train_step())
        with PeakMemory(device) as mem:
            ts = _time_steps(step, device, spec["warmup"], spec["reps"])
        return {"times": ts, "peak": mem.peak, "loss": last["loss"], "config": LABELS[case]}

    import transformers

    cfg = t.model_config
    sd = {k: v.detach().clone() for k, v in t.raw_model.state_dict().items()}
    b = t.data.train.batch(t.sampler.next_batch())
    ids, labels = b["input_ids"].to(device), b["labels"].to(device)
    del t
    gc.collect()
    hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "dtype")})
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hcfg).to(device=device, dtype=torch.bfloat16)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    del sd
    hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    hf.train()
    last = {}

    def hf_step():
        out = hf(input_ids=ids, labels=labels)
        out.loss.backward()
        hopt.step()
        hopt.zero_grad(set_to_none=True)
        last["loss"] = float(out.loss)

    with PeakMemory(device) as mem:
        ts = _time_steps(hf_step, device, spec["warmup"], spec["reps"])
    return {"times": ts, "peak": mem.peak, "loss": last["loss"], "config": LABELS["hf"]}


def _spawn(spec: dict) -> dict:
    import thrifty

    env = dict(os.environ)
    src = str(Path(thrifty.__file__).resolve().parents[1])  # the thrifty under test, in the child too
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "thrifty.bench.train", "--worker", json.dumps(spec)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench case {spec['case']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(device, quick: bool = False, *, preset=None, batch=None, seq=None, reps=None, hf_reps=None,
        cases=("default", "lean", "hf")) -> Bench:
    from thrifty.models import LlamaConfig
    from thrifty.train.trainer import measured_matmul_flops, model_flops_per_token

    device = torch.device(device)
    if not cases or any(c not in LABELS for c in cases):
        raise ValueError(f"bench train: cases must be names from {', '.join(LABELS)}, got {cases!r}")
    p0, b0, s0 = _configs(device, quick)
    preset, batch, seq = preset or p0, batch or b0, seq or s0
    b = Bench("train", device, rooflines=False, quick=quick)
    b.matmul_flops = b.matmul_rates["bfloat16"] = measured_matmul_flops(device, torch.bfloat16)
    b.matmul_dtype = "bfloat16"
    fp32_flops = measured_matmul_flops(device, torch.float32)
    # torch's bf16 CPU GEMM below avx512_bf16 runs far under its float32 one: the baseline's full
    # step then takes minutes, and is timed once without a warm-up. Where bf16 is native (at least
    # float32's rate) the baseline gets a warm-up step and 3 timed ones, like thrifty.
    slow_hf = device.type == "cpu" and not quick and b.matmul_flops < fp32_flops
    reps = reps or 5
    hf_reps = hf_reps or (1 if slow_hf else 3)
    cfg = LlamaConfig.preset(preset)
    tokens = batch * seq
    flops = model_flops_per_token(cfg, seq) * tokens
    run_dir = tempfile.mkdtemp(prefix="thrifty-bench-train-")
    results = {}
    try:
        for case in cases:
            spec = dict(case=case, device=str(device), preset=preset, batch=batch, seq=seq, run_dir=run_dir,
                        warmup=0 if (case == "hf" and slow_hf) else 1, reps=hf_reps if case == "hf" else reps)
            t0 = time.perf_counter()
            r = results[case] = _spawn(spec)
            s = statistics.median(r["times"])
            print(f"  {case:8s} {tokens / s:9.1f} tok/s  step {s:8.2f} s (runs {', '.join(f'{x:.2f}' for x in r['times'])})"
                  f"  peak +{r['peak'] / 2**20:.0f} MiB  loss {r['loss']:.3f}  [{time.perf_counter() - t0:.0f} s]  "
                  f"{r['config']}", flush=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    hf = results.get("hf")
    t_hf = statistics.median(hf["times"]) if hf else None
    for case in [c for c in cases if c != "hf"]:
        r = results[case]
        t = statistics.median(r["times"])
        c = Case(op=f"train step {preset} ({case})", shape=f"{batch}x{seq}", dtype="bfloat16", thrifty_s=t,
                 torch_s=t_hf, speedup=(t_hf / t) if t_hf else None, flops=flops, tflops=flops / t / 1e12,
                 pct_roofline=100 * flops / t / b.matmul_flops, roofline="bfloat16 matmul", baseline="transformers+torch AdamW fused",
                 extra={"config": r["config"], "tokens_per_s": tokens / t, "step_times_s": r["times"],
                        "mfu_bf16": flops / t / b.matmul_flops, "mfu_fp32": flops / t / fp32_flops,
                        "peak_mem_MiB": r["peak"] / 2**20, "baseline_config": LABELS["hf"],
                        "baseline_tokens_per_s": tokens / t_hf if t_hf else None,
                        "baseline_step_times_s": hf["times"] if hf else None,
                        "baseline_mfu_bf16": flops / t_hf / b.matmul_flops if t_hf else None,
                        "baseline_peak_mem_MiB": hf["peak"] / 2**20 if hf else None,
                        "fp32_matmul_flops": fp32_flops, "load_average": os.getloadavg()})
        b.cases.append(c)
        print(f"  {c.op} {c.shape}: thrifty {tokens / t:,.1f} tok/s (MFU {100 * c.extra['mfu_bf16']:.1f}% of bf16 matmul, "
              f"{100 * c.extra['mfu_fp32']:.1f}% of fp32; peak +{c.extra['peak_mem_MiB']:.0f} MiB)"
              + (f"; baseline {tokens / t_hf:,.1f} tok/s (MFU {100 * c.extra['baseline_mfu_bf16']:.1f}%, peak "
                 f"+{c.extra['baseline_peak_mem_MiB']:.0f} MiB); x{c.speedup:.2f} tokens/s, "
                 f"x{c.extra['peak_mem_MiB'] / c.extra['baseline_peak_mem_MiB']:.2f} memory" if t_hf else ""), flush=True)
    print(f"  matmul rates in this run: bf16 {b.matmul_flops / 1e9:.2f} GFLOP/s, fp32 {fp32_flops / 1e9:.2f} GFLOP/s; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return b


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", type=bench_device, help="cpu or cuda[:N]")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 x 128")
    ap.add_argument("--preset", choices=["tiny", "small"])
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--reps", type=int, help="timed thrifty steps after one warm-up (default 5)")
    ap.add_argument("--hf-reps", type=int, help="timed baseline steps (default 3; 1 without a warm-up on CPUs whose "
                    "bf16 matmul is slower than float32)")
    ap.add_argument("--cases", default=("default", "lean", "hf"), type=case_list,
                    help="comma-separated subset of default,lean,lean8,hf (default: default,lean,hf)")
    ap.add_argument("--out", type=Path, help=OUT_HELP)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))), flush=True)
        return
    from thrifty.bench._env import reexec_with_bench_env  # the other families' allocator settings, both sides

    if argv is None:  # a script run as a program re-executes itself; a caller passing argv is not replaced
        reexec_with_bench_env(sys.argv)
    run(torch.device(args.device), quick=args.quick, preset=args.preset, batch=args.batch, seq=args.seq,
        reps=args.reps, hf_reps=args.hf_reps, cases=args.cases).report(args.out)


if __name__ == "__main__":
    main()
