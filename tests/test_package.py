"""The package itself: `thrifty info`, the CLI, the ISA switch, kernels on ATen's thread pool."""
from __future__ import annotations

import io
import json
import os
import struct
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
    assert d["cpu_bf16_dot"] is thrifty._C.cpu_uses_bf16_dot()
    text = thrifty.info()
    for needle in (thrifty.__version__, torch.__version__, d["cpu_isa_in_use"], "GPUs seen"):
        assert needle in text


def test_info_prints_and_returns_the_summary(capsys):
    text = thrifty.info()
    assert capsys.readouterr().out == text + "\n" and text == thrifty._info.info_text()
    buf = io.StringIO()
    assert thrifty.info(file=buf) == text and buf.getvalue() == text + "\n"
    assert capsys.readouterr().out == ""
    # `thrifty info` prints the same text
    cli = subprocess.run([sys.executable, "-m", "thrifty.cli", "info"], env=PYTHON_ENV, capture_output=True,
                         text=True, check=True).stdout
    assert cli.count("GPUs seen") == 1 and cli.startswith(f"thrifty {thrifty.__version__}")


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
    assert d["cuda_quant_mma"] is (True if d["cuda_built"] else None)


def test_bad_isa_env_fails_import_clearly():
    env = {**PYTHON_ENV, "THRIFTY_CPU_ISA": "avx9000"}
    r = subprocess.run([sys.executable, "-c", "import thrifty"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "THRIFTY_CPU_ISA" in r.stderr and "avx9000" in r.stderr


@pytest.mark.skipif(not thrifty._C.build_info()["cuda"], reason="THRIFTY_CUDA_QUANT_MMA is read by CUDA builds")
def test_bad_quant_mma_env_fails_import_clearly():
    env = {**PYTHON_ENV, "THRIFTY_CUDA_QUANT_MMA": "fast"}
    r = subprocess.run([sys.executable, "-c", "import thrifty"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "unknown mode 'fast'" in r.stderr and "Set THRIFTY_CUDA_QUANT_MMA to on or off" in r.stderr


def test_set_cpu_isa_rejects_unknown_level():
    with pytest.raises(ValueError, match="avx9000"):
        thrifty._C.set_cpu_isa("avx9000")


def _elf_needed(path: str) -> list[str] | None:
    """The DT_NEEDED entries of a 64-bit little-endian ELF file (None for any other format)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for _name, typ, _flags, _addr, off, size, link, *_ in sections:
        if typ != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        needed = []
        for pos in range(off, off + size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                needed.append(data[strtab + val:data.index(b"\0", strtab + val)].decode())
        return needed
    return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and libstdc++ are Linux's")
def test_extension_links_shared_libstdcxx():
    # A toolchain with libstdc++.a but no libstdc++.so beside it links a private static libstdc++
    # into _C; its locale facets then clash with torch's shared one and the first TORCH_CHECK
    # message that formats an integer crashed the process (CMakeLists.txt names the .so then).
    needed = _elf_needed(thrifty._C.__file__)
    if needed is None:
        pytest.skip("not a 64-bit little-endian ELF")
    assert any(n.startswith("libstdc++.so") for n in needed), f"_C does not load the shared libstdc++: {needed}"
    with pytest.raises(ValueError, match="must have size 8 in dimension 0"):
        thrifty.ops.rms_norm(torch.randn(3, 8), torch.ones(7))
