"""The package itself: `thrifty info`, the CLI, the ISA switch, kernels on ATen's thread pool."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import thrifty

PYTHON_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def test_info_fields():
    d = thrifty.info_dict()
    assert d["thrifty"] == thrifty.__version__
    assert d["torch_running"] == torch.__version__
    assert d["torch_built_against"].split("+")[0] == torch.__version__.split("+")[0]
    assert d["cpu_isa_in_use"] in d["cpu_isa_compiled"].split(",")
    assert d["threads"] == torch.get_num_threads()
    text = thrifty.info()
    for needle in (thrifty.__version__, torch.__version__, d["cpu_isa_in_use"], "GPUs seen"):
        assert needle in text


def test_kernels_use_aten_thread_pool():
    # A build without -fopenmp compiles at::parallel_for's OpenMP pragma away: one thread.
    want = min(2, torch.get_num_threads(), os.cpu_count() or 1)
    if want < 2:
        pytest.skip("one thread available")
    assert thrifty._C.parallel_threads_used(64) >= 2
    # ... and torch.set_num_threads still governs it.
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert thrifty._C.parallel_threads_used(16) == 1
    finally:
        torch.set_num_threads(prev)


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "thrifty.cli", "info", "--json"], env=PYTHON_ENV,
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert d["thrifty"] == thrifty.__version__ and "cuda_archs" in d and "threads_in_kernels" in d


def test_bad_isa_env_fails_import_clearly():
    env = {**PYTHON_ENV, "THRIFTY_CPU_ISA": "avx9000"}
    r = subprocess.run([sys.executable, "-c", "import thrifty"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "THRIFTY_CPU_ISA" in r.stderr and "avx9000" in r.stderr


def test_set_cpu_isa_rejects_unknown_level():
    with pytest.raises(ValueError, match="avx9000"):
        thrifty._C.set_cpu_isa("avx9000")
