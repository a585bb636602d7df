"""Shared fixtures: every CPU ISA level this machine has, and the devices present.

Tests that need a GPU take the `device` fixture (its "cuda" case is marked `cuda` and
skipped without one) or are marked `@pytest.mark.cuda` themselves.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

import thrifty


def _test_isas() -> list[str]:
    """The levels the `cpu_isa` fixture runs: every one available, or those THRIFTY_TEST_ISAS
    names (comma-separated, e.g. "avx512,avx512_bf16" for tools/test_avx512_emulated.sh)."""
    available = thrifty._C.cpu_isa_available()
    wanted = [s.strip() for s in os.environ.get("THRIFTY_TEST_ISAS", "").split(",") if s.strip()]
    if not wanted:
        return available
    missing = [s for s in wanted if s not in available]
    if missing:  # never let a typo or a wrong build quietly test nothing
        raise pytest.UsageError(f"THRIFTY_TEST_ISAS asks for {missing}, not available here "
                                f"(available: {available})")
    return wanted


ISAS = _test_isas()
HAS_CUDA = torch.cuda.is_available() and thrifty._C.build_info()["cuda"]


# CUDA kernels' lane-level logic compiled for the CPU (tests/cuda_emulated/): needs g++ with C++20 and F16C, which
# thrifty's avx2 level assumes too (cpu/vec.h: AVX2 + FMA + F16C).
needs_cuda_emulation = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None
    or "avx2" not in thrifty._C.cpu_isa_available(),
    reason="the CUDA emulation checks need g++ and an x86-64 CPU with AVX2 / F16C")


def run_cuda_emulation(source: str, tmp_path: Path, *args: str) -> str:
    """Compiles tests/cuda_emulated/<source> against csrc/ with g++, runs it with `args`, asserts it printed
    "all passed" and exited 0; returns its output."""
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / Path(source).stem
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-mf16c", f"-I{root / 'csrc'}",
                    str(root / "tests" / "cuda_emulated" / source), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "all passed" in run.stdout, run.stdout + run.stderr
    return run.stdout


@pytest.fixture(autouse=True)
def _seeded_rng(request):
    """Each test draws its random inputs from its own seed (a hash of its id): a run is reproducible,
    and a failure shows again with the same inputs (under pytest-xdist too) instead of coming and going."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the test once per CPU ISA level available (scalar, avx2, ...)."""
    prev = thrifty._C.set_cpu_isa(request.param)
    yield request.param
    thrifty._C.set_cpu_isa(prev)


def cpu_isa_with_bf16_dot_fixture():
    """A `cpu_isa` fixture for modules whose kernels have a VDPBF16PS and a float32 FMA path at
    avx512_bf16 (picked per CPU by set_cpu_bf16_dot's "auto"): that level runs once with each.
    Use as `cpu_isa = cpu_isa_with_bf16_dot_fixture()` at module level."""
    cases = [(isa, dot) for isa in ISAS for dot in (("on", "off") if isa == "avx512_bf16" else (None,))]

    @pytest.fixture(params=cases, ids=lambda c: c[0] + {"on": "-dot", "off": "-fma", None: ""}[c[1]])
    def cpu_isa(request):
        isa, dot = request.param
        prev = thrifty._C.set_cpu_isa(isa)
        prev_dot = thrifty._C.set_cpu_bf16_dot(dot) if dot else None
        yield isa
        thrifty._C.set_cpu_isa(prev)
        if prev_dot:
            thrifty._C.set_cpu_bf16_dot(prev_dot)
    return cpu_isa


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of thrifty")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
