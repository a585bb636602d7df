"""The process environment the CPU benchmarks run in (set before torch and glibc start).

Every benchmarked op returns a fresh output tensor. With glibc's defaults a large block
(> 32 MiB) is mmap-ed on every allocation and unmapped on free, so each call pays a page fault
and a kernel page-zeroing pass per output page: the op then runs at the speed of
``x.clone()``, not of a copy into existing memory, and memory-bound kernels (thrifty's and
the PyTorch baselines alike) measure the allocator instead of themselves. The benchmarks
therefore run with
  THP_MEM_ALLOC_ENABLE=1      PyTorch's CPU allocator asks for 2 MiB transparent huge pages
  MALLOC_MMAP_MAX_=0          glibc serves large blocks from its heap ...
  MALLOC_TRIM_THRESHOLD_=...  ... and keeps freed memory there for reuse
which is also the setting we recommend for CPU training and serving processes (the same
effect as the jemalloc/tcmalloc preload that CPU inference guides recommend). Variables already
set are respected; THRIFTY_BENCH_DEFAULT_ALLOC=1 runs with the allocator defaults instead.
"""
from __future__ import annotations

import os
import sys

BENCH_ENV = {
    "THP_MEM_ALLOC_ENABLE": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
}
_MARK = "THRIFTY_BENCH_ENV_SET"


def allocator_description() -> str:
    """One line saying which allocator settings this process runs with (for the reports)."""
    if os.environ.get("THRIFTY_BENCH_DEFAULT_ALLOC") == "1":
        return "allocator defaults (THRIFTY_BENCH_DEFAULT_ALLOC=1)"
    return ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in BENCH_ENV)


def reexec_with_bench_env(argv: list[str]) -> None:
    """Re-runs this process as ``python argv...`` with BENCH_ENV (unless already done or opted out).

    glibc reads MALLOC_* at start-up and torch reads THP_MEM_ALLOC_ENABLE once, so the
    variables only take effect in a new process."""
    if os.environ.get(_MARK) == "1" or os.environ.get("THRIFTY_BENCH_DEFAULT_ALLOC") == "1":
        return
    env = dict(os.environ)
    for k, v in BENCH_ENV.items():
        env.setdefault(k, v)
    env[_MARK] = "1"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
