"""glibc allocator settings for long-running CPU processes (the trainer), applied in-process.

glibc serves a block over its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh mmap and unmaps
it on free, so a training step whose activations, logits and gradients are tens of MiB each pays a page fault
and a kernel zeroing pass per page, on every step. On the 2-vCPU box the `small` preset's 1 x 512 bf16 step ran
1.51 s with glibc's defaults and 1.28 s with large blocks kept on the heap (the transformers baseline: 1.50 and
1.60 s). ``tune_cpu_malloc`` does through mallopt(3) what thrifty.bench._env does for the benchmarks through
the environment: M_MMAP_MAX = 0 (large blocks come from the heap) and M_TRIM_THRESHOLD = 2 GiB - 1 (freed heap
memory is kept for reuse). The cost: the process keeps its peak heap resident instead of returning it.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, glibc's malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
OPT_OUT = "THRIFTY_DEFAULT_ALLOC"


def _skip_reason() -> str | None:
    for var in (OPT_OUT, "THRIFTY_BENCH_DEFAULT_ALLOC"):  # the second: benchmarks timing both sides with the defaults
        if os.environ.get(var) == "1":
            return f"{var}=1"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    set_vars = [k for k in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ]
    if set_vars:
        return "set by the environment (" + ", ".join(set_vars) + ")"
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    return None


def tune_cpu_malloc() -> str:
    """Keeps large blocks on glibc's heap for this process (see the module docstring); says what it did.

    Does nothing where the allocator is not glibc's, where MALLOC_* variables or a preloaded allocator already
    decide, or with THRIFTY_DEFAULT_ALLOC=1."""
    reason = _skip_reason()
    if reason is not None:
        return f"allocator defaults kept ({reason})"
    libc = ctypes.CDLL(None)  # the process's own C library: glibc here
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not ok:
        return "allocator defaults kept (mallopt refused)"
    return f"large blocks kept on glibc's heap (mallopt; {OPT_OUT}=1 keeps the defaults)"
