"""The `thrifty` command: info | bench | train | generate | quantize | demo.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; this file only routes, so `thrifty info` stays fast and a
subcommand's heavy imports happen only when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("thrifty._info", "print the build (torch, CUDA archs, CPU ISA) and the machine"),
    "bench": ("thrifty.bench.cli", "run kernel benchmarks against PyTorch: thrifty bench [family ...]"),
    "train": ("thrifty.train.cli", "train or fine-tune a Llama-family model from raw text"),
    "generate": ("thrifty.train.generate_cli", "sample text from a trained run or a Hugging Face model directory"),
    "quantize": ("thrifty.quant.cli", "quantize a model directory to int8/int4 weights"),
    "demo": ("thrifty.train.demo", "train the tiny preset on the embedded corpus for ~3 minutes, then generate"),
}


# The packages a subcommand needs beyond torch and numpy (pyproject's extras): checked before it starts, so a
# plain `pip install .` gets one line naming the extra, not a traceback (or a failure after the training ran).
NEEDS = {  # (datasketch, for near-dup removal, only once a corpus has two documents: data/pipeline.py says so then)
    "train": ("train", ("tokenizers", "safetensors", "tqdm")),
    "demo": ("train", ("tokenizers", "safetensors", "tqdm")),
    "generate": ("train", ("tokenizers", "safetensors")),
    "quantize": ("hf", ("safetensors",)),
}


def missing_extra(name: str) -> str | None:
    """The error line for subcommand ``name`` when a package it needs is not installed, else None."""
    import importlib.util

    extra, mods = NEEDS.get(name, ("", ()))
    gone = [m for m in mods if importlib.util.find_spec(m) is None]
    if not gone:
        return None
    return (f"thrifty {name}: error: needs {', '.join(gone)} (the '{extra}' extra): "
            f"pip install 'thrifty[{extra}]' (in a checkout: pip install --no-build-isolation '.[{extra}]')")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="thrifty", description="Cheap LLM training and serving on PyTorch.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
    return ap


def main(argv: list[str] | None = None) -> int:
    as_command = argv is None  # run as the `thrifty` program, not called from Python with an argument list
    argv = sys.argv[1:] if argv is None else list(argv)
    # Import only the chosen subcommand's module (heavy ones import torch extras lazily).
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        module, help_text = COMMANDS[name]
        mod = importlib.import_module(module)
        p = argparse.ArgumentParser(prog=f"thrifty {name}", description=help_text)
        mod.add_arguments(p)
        args = p.parse_args(argv[1:])  # bad arguments: one usage line and exit code 2, before anything runs
        why = missing_extra(name)
        if why:
            print(why, file=sys.stderr)
            return 2
        if name == "bench" and as_command:
            # Allocator settings under which fresh outputs do not page-fault on every call
            # (thrifty.bench._env says why); they act only in a new process. Only the program
            # re-executes itself: main(["bench", ...]) called from Python must not replace the caller.
            from thrifty.bench._env import reexec_with_bench_env

            reexec_with_bench_env(["-m", "thrifty.cli", *argv])
        return int(mod.main(args) or 0)
    ap = argparse.ArgumentParser(prog="thrifty", description="Cheap LLM training and serving on PyTorch.")
    ap.add_argument("command", nargs="?", choices=list(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
