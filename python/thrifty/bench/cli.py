"""`thrifty bench [family ...]`: runs kernel benchmarks, prints markdown tables, writes JSON."""
from __future__ import annotations

import importlib

import torch

# family -> module with run(device, quick) -> Bench
FAMILIES = ["norm", "attention", "optim", "quant", "model", "train"]


def available_families() -> list[str]:
    out = []
    for f in FAMILIES:
        try:
            importlib.import_module(f"thrifty.bench.{f}")
        except ModuleNotFoundError as err:
            if err.name != f"thrifty.bench.{f}":
                raise
            continue
        out.append(f)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("families", nargs="*", help=f"families to run (default: all of {', '.join(FAMILIES)} present)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")


def main(args) -> int:
    have = available_families()
    families = args.families or have
    unknown = [f for f in families if f not in have]
    if unknown:
        raise SystemExit(f"thrifty bench: unknown benchmark family {unknown}; available: {have}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("thrifty bench: --device cuda but no CUDA GPU is visible")
    for f in families:
        print(f"== {f} ==", flush=True)
        mod = importlib.import_module(f"thrifty.bench.{f}")
        path = mod.run(device, quick=args.quick).report()
        print(f"(wrote {path})")
    return 0
