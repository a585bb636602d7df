"""thrifty._alloc: the trainer's in-process glibc settings (large blocks kept on the heap), checked in fresh
processes since mallopt changes the whole process."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, sys
    from thrifty._alloc import tune_cpu_malloc
    print(tune_cpu_malloc())
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    p = libc.malloc(100 << 20)  # far above glibc's mmap threshold
    heap = [l for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
    lo, hi = (int(x, 16) for x in heap[0].split()[0].split("-")) if heap else (0, 0)
    print("heap" if lo <= p < hi else "mmap")
""")


def _probe(**env) -> list[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("THRIFTY_DEFAULT_ALLOC",
                                                                                           "THRIFTY_BENCH_DEFAULT_ALLOC")}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, check=True)
    return r.stdout.strip().splitlines()


glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")


@glibc_only
def test_large_blocks_come_from_the_heap_after_tuning():
    said, where = _probe()
    assert said.startswith("large blocks kept on glibc's heap") and where == "heap"


@glibc_only
@pytest.mark.parametrize("env,reason", [({"THRIFTY_DEFAULT_ALLOC": "1"}, "THRIFTY_DEFAULT_ALLOC=1"),
                                        ({"THRIFTY_BENCH_DEFAULT_ALLOC": "1"}, "THRIFTY_BENCH_DEFAULT_ALLOC=1"),
                                        ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "set by the environment")])
def test_opt_outs_keep_the_defaults(env, reason):
    said, where = _probe(**env)
    assert said.startswith("allocator defaults kept") and reason in said and where == "mmap"
