"""Training-step benchmark: thrifty (thrifty.models.Llama on thrifty ops, packed varlen input,
fused linear cross-entropy, thrifty.optim.AdamW with bf16 params + fp32 master weights) against a
plain PyTorch + transformers loop (LlamaForCausalLM with SDPA attention, bf16 params,
torch.optim.AdamW(fused=True)), same config, batch and precision, in the same process.

Reports training tokens/s, the speedup, MFU against the bf16 matmul rate measured in this run,
and peak memory (CUDA: max allocated; CPU: peak resident set growth, sampled every 2 ms).
Full: the `small` preset, seq 512. --quick: the `tiny` preset, seq 128.
"""
from __future__ import annotations

import gc
import statistics
import threading
import time

import torch

from thrifty.bench.common import Bench, Case, sync


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


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
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop = True
            self._t.join()
            self.peak = max(self._max, _rss()) - self.base
        return False


def _time_steps(step, device, warmup=1, reps=3) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _configs(device, quick):
    if quick:
        return "tiny", 2, 128
    if torch.device(device).type == "cuda":
        return "small", 16, 512
    return "small", 1, 512


def run(device, quick: bool = False) -> Bench:
    from thrifty.models import Llama, LlamaConfig
    from thrifty.optim import AdamW
    from thrifty.train.trainer import measured_matmul_flops, model_flops_per_token

    device = torch.device(device)
    preset, batch, seq = _configs(device, quick)
    b = Bench("train", device, rooflines=False)
    b.matmul_flops = measured_matmul_flops(device, torch.bfloat16)
    b.matmul_dtype = "bfloat16"
    cfg = LlamaConfig.preset(preset, max_position_embeddings=max(seq, 1024))
    tokens = batch * seq
    flops = model_flops_per_token(cfg, seq) * tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)

    # ---- thrifty: packed flat input, one document per row, fused loss, master-weight AdamW
    torch.manual_seed(0)
    model = Llama(cfg).init_weights().to(device=device, dtype=torch.bfloat16)
    model.reset_rope()  # rotary cache back to float32
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, master_weights=True)
    cu = torch.arange(0, tokens + 1, seq, dtype=torch.int32, device=device)
    pos = torch.arange(seq, device=device).repeat(batch)
    flat = ids.reshape(-1)

    def thrifty_step():
        loss = model(flat, positions=pos, labels=flat, cu_seqlens=cu)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with PeakMemory(device) as mem_t:
        t_thrifty = _time_steps(thrifty_step, device)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model, opt
    gc.collect()

    # ---- baseline: transformers LlamaForCausalLM (SDPA), bf16, torch fused AdamW
    t_hf = mem_hf = None
    try:
        import transformers
        hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "dtype")})
        hcfg._attn_implementation = "sdpa"
        hf = transformers.LlamaForCausalLM(hcfg).to(device=device, dtype=torch.bfloat16)
        hf.load_state_dict(sd, strict=False)
        hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

        def hf_step():
            out = hf(input_ids=ids, labels=ids)
            out.loss.backward()
            hopt.step()
            hopt.zero_grad(set_to_none=True)

        with PeakMemory(device) as mem_hf_ctx:
            t_hf = _time_steps(hf_step, device)
        mem_hf = mem_hf_ctx.peak
        del hf, hopt
    except ImportError:
        pass
    c = Case(op=f"train step {preset}", shape=f"{batch}x{seq}", dtype="bfloat16", thrifty_s=t_thrifty, torch_s=t_hf,
             speedup=(t_hf / t_thrifty) if t_hf else None, flops=flops, tflops=flops / t_thrifty / 1e12,
             pct_roofline=100 * flops / t_thrifty / b.matmul_flops, baseline="transformers+torch AdamW fused",
             extra={"tokens_per_s": tokens / t_thrifty, "baseline_tokens_per_s": tokens / t_hf if t_hf else None,
                    "mfu": flops / t_thrifty / b.matmul_flops,
                    "baseline_mfu": flops / t_hf / b.matmul_flops if t_hf else None,
                    "peak_mem_MiB": mem_t.peak / 2**20, "baseline_peak_mem_MiB": mem_hf / 2**20 if mem_hf else None,
                    "params_M": sum(v.numel() for v in sd.values()) / 1e6})
    b.cases.append(c)
    print(f"  {c.op} {c.shape}: thrifty {tokens / t_thrifty:,.0f} tok/s (MFU {100 * c.extra['mfu']:.1f}%, peak "
          f"{c.extra['peak_mem_MiB']:.0f} MiB)" + (f"; baseline {tokens / t_hf:,.0f} tok/s (MFU "
          f"{100 * c.extra['baseline_mfu']:.1f}%, peak {c.extra['baseline_peak_mem_MiB']:.0f} MiB); x{c.speedup:.2f}"
                                                    if t_hf else ""), flush=True)
    return b
