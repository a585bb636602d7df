"""One call of each GPU kernel whose speed is in question, inside an NVTX range "profile", for Nsight Compute:

    ncu --nvtx --nvtx-include "profile/" --clock-control none --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python tools/dev/gpu_profile.py [target ...]

(bench/gpu_check.sh runs that with GPU_CHECK_NCU=1.) Targets, each warmed up outside the range first:
  quant      W4A16 / W8A16 / W8A8 decode, K = N = 8192, M = 1 and 16 (the mma kernels, RESULTS.md stop 19)
  optim      AdamW8bit step, 50M float32 parameters in 25 tensors (43% of copy bandwidth at stop 19)
  norm       rms_norm backward, 16384 x 4096 bf16 (69% of copy bandwidth)
  attention  attention forward, b2 h16 s1024 d128 bf16, causal and not (causal slower than non-causal)
Without arguments: all of them. Prints what each range holds; ncu prints the kernels' sections.
`--cpu` runs the same calls on the CPU without NVTX ranges: a dry run of this script.
"""
from __future__ import annotations

import sys

import torch

import thrifty
from thrifty.nn.quant import QuantLinear


def _profiled(name: str, fn) -> None:
    for _ in range(3):  # lazy initialisation, allocator pools, the shared-memory opt-ins: outside the range
        fn()
    if not torch.cuda.is_available():  # --cpu dry run
        print(f"ran: {name}", flush=True)
        return
    torch.cuda.synchronize()
    print(f"profiled: {name}", flush=True)  # ncu's report of the range's kernels follows in the same log
    torch.cuda.nvtx.range_push("profile")  # one name: ncu's "profile/" matches that push/pop range
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


def quant(dev) -> None:
    lin = torch.nn.Linear(8192, 8192, bias=False, device=dev)
    layers = {"W4A16": QuantLinear.from_float(lin, bits=4, group_size=128),
              "W8A16": QuantLinear.from_float(lin, bits=8),
              "W8A8": QuantLinear.from_float(lin, bits=8, act_bits=8)}
    with torch.inference_mode():
        for m in (1, 16):
            x = torch.randn(m, 8192, device=dev, dtype=torch.bfloat16)
            for name, layer in layers.items():
                _profiled(f"{name} M={m}", lambda: layer(x))


def optim(dev) -> None:
    params = [torch.nn.Parameter(torch.randn(2_000_000, device=dev)) for _ in range(25)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = thrifty.optim.AdamW8bit(params, lr=1e-3)
    _profiled("AdamW8bit step, 50M params", opt.step)


def norm(dev) -> None:
    x = torch.randn(16384, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    _, rstd = torch.ops.thrifty.rms_norm(x, w, 1e-6)
    _profiled("rms_norm backward 16384x4096", lambda: torch.ops.thrifty.rms_norm_backward(gy, x, w, rstd, None))


def attention(dev) -> None:
    q, k, v = (torch.randn(2, 1024, 16, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    with torch.inference_mode():
        for causal in (False, True):
            _profiled(f"attention fwd s1024 causal={causal}",
                      lambda: thrifty.ops.flash_attention(q, k, v, causal=causal))


TARGETS = {"quant": quant, "optim": optim, "norm": norm, "attention": attention}


def main(argv: list[str]) -> int:
    cpu = "--cpu" in argv
    argv = [a for a in argv if a != "--cpu"]
    if not cpu and not torch.cuda.is_available():
        print("gpu_profile: no CUDA device (--cpu: a dry run on the CPU)", file=sys.stderr)
        return 2
    unknown = [a for a in argv if a not in TARGETS]
    if unknown:
        print(f"gpu_profile: unknown target(s) {unknown}; expected some of {list(TARGETS)}", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if cpu else "cuda")
    for name in argv or list(TARGETS):
        TARGETS[name](dev)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
