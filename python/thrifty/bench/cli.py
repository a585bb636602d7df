"""`thrifty bench [family ...]`: runs kernel benchmarks, prints markdown tables, writes JSON."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from thrifty.bench.common import OUT_HELP, bench_device

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


def family_name(value: str) -> str:
    """argparse type of a family argument: a name from FAMILIES (else a usage error, exit code 2)."""
    if value not in FAMILIES:
        raise argparse.ArgumentTypeError(f"unknown benchmark family {value!r} (choose from {', '.join(FAMILIES)})")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("families", nargs="*", type=family_name,
                        help=f"families to run (default: all of {', '.join(FAMILIES)} present)")
    parser.add_argument("--device", default="cpu", type=bench_device, help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    parser.add_argument("--out", type=Path, help=OUT_HELP)


def main(args) -> int:
    have = available_families()
    families = list(dict.fromkeys(args.families or have))  # each family once, in the order named
    unknown = [f for f in families if f not in have]
    if unknown:
        print(f"thrifty bench: error: unknown benchmark family {', '.join(map(repr, unknown))} "
              f"(available: {', '.join(have)})", file=sys.stderr)
        return 2
    try:
        bench_device(str(args.device))  # a Namespace built by hand skips argparse's check
    except argparse.ArgumentTypeError as err:
        print(f"thrifty bench: error: argument --device: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    for f in families:
        print(f"== {f} ==", flush=True)
        mod = importlib.import_module(f"thrifty.bench.{f}")
        path = mod.run(device, quick=args.quick).report(getattr(args, "out", None))
        print(f"(wrote {path})")
    return 0
