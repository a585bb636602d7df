"""Shared fixtures: every CPU ISA level this machine has, and the devices present.

Tests that need a GPU take the `device` fixture (its "cuda" case is marked `cuda` and
skipped without one) or are marked `@pytest.mark.cuda` themselves.
"""
from __future__ import annotations

import os

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


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Runs the test once per CPU ISA level available (scalar, avx2, ...)."""
    prev = thrifty._C.set_cpu_isa(request.param)
    yield request.param
    thrifty._C.set_cpu_isa(prev)


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
