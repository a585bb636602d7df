"""The package and its programs as a new user meets them: a missing build, bad settings, `thrifty bench`
called wrongly or from Python, bench scripts imported, thrifty.nn.RMSNorm built on the meta device."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import thrifty
import thrifty.cli
from thrifty.nn import RMSNorm

ROOT = Path(__file__).resolve().parents[1]
PYTHON_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _run(args, env=None, cwd=None):
    return subprocess.run([sys.executable, *args], env=env or PYTHON_ENV, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _package_copy_without_extension(tmp_path: Path) -> Path:
    src = Path(thrifty.__file__).parent
    dst = tmp_path / "thrifty"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    return dst


def test_missing_extension_is_named_not_blamed_on_a_circular_import(tmp_path):
    _package_copy_without_extension(tmp_path)
    r = _run(["-c", "import thrifty"], env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    assert "no compiled extension _C" in r.stderr and "was not built or not installed" in r.stderr
    assert "circular import" not in r.stderr
    assert "build_inplace.sh" in r.stderr and "pip install --no-build-isolation" in r.stderr


def test_extension_built_for_another_python_is_named(tmp_path):
    dst = _package_copy_without_extension(tmp_path)
    (dst / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"not loaded")
    r = _run(["-c", "import thrifty"], env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode != 0
    assert "_C.cpython-39-x86_64-linux-gnu.so" in r.stderr and "another Python" in r.stderr
    assert "circular import" not in r.stderr


def test_bad_bf16_dot_env_fails_the_import_with_a_hint():
    r = _run(["-c", "import thrifty"], env={**PYTHON_ENV, "THRIFTY_CPU_BF16_DOT": "maybe"})
    assert r.returncode != 0
    assert "maybe" in r.stderr and "Set THRIFTY_CPU_BF16_DOT to one of auto, on, off" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["bench", "nosuch"], "unknown benchmark family 'nosuch'"),
    (["bench", "--device", "tpu"], "not a device"),
    (["bench", "--device", "meta"], "benchmarks run on cpu or cuda"),
])
def test_bench_usage_errors_exit_2_without_a_traceback(args, needle):
    r = _run(["-m", "thrifty.cli", *args])
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU can run the benchmarks")
def test_bench_on_cuda_without_one_is_a_usage_error():
    r = _run(["-m", "thrifty.cli", "bench", "norm", "--device", "cuda"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("built without CUDA kernels" in r.stderr) or ("no CUDA GPU is visible" in r.stderr)


def test_cli_main_called_from_python_does_not_replace_the_process(monkeypatch):
    import thrifty.bench._env as bench_env
    import thrifty.bench.cli as bench_cli

    def no_reexec(*_a, **_k):
        raise AssertionError("thrifty.cli.main([...]) re-executed the calling process")

    seen = []
    monkeypatch.setattr(bench_env, "reexec_with_bench_env", no_reexec)
    monkeypatch.setattr(bench_cli, "main", lambda args: seen.append((args.families, args.device, args.quick)) or 0)
    assert thrifty.cli.main(["bench", "norm", "--quick"]) == 0
    assert seen == [(["norm"], "cpu", True)]
    with pytest.raises(SystemExit) as exc:  # argparse's usage error, raised in the caller's process
        thrifty.cli.main(["bench", "nosuch"])
    assert exc.value.code == 2


def test_bench_cli_main_with_a_hand_built_namespace_checks_family_and_device(capsys):
    import argparse

    import thrifty.bench.cli as bench_cli

    assert bench_cli.main(argparse.Namespace(families=["nosuch"], device="cpu", quick=True)) == 2
    assert "unknown benchmark family 'nosuch'" in capsys.readouterr().err
    assert bench_cli.main(argparse.Namespace(families=["norm"], device="tpu", quick=True)) == 2
    assert "argument --device" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_bench_scripts_do_nothing_when_imported(script, monkeypatch):
    # If a script ran its benchmark on import, it would parse pytest's argv and exit or take minutes.
    monkeypatch.setattr(sys, "argv", ["not-a-bench", "--no-such-flag"])
    spec = importlib.util.spec_from_file_location(f"bench_script_{script[:-3]}", ROOT / "bench" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(getattr(mod, "main"))


def test_rmsnorm_reset_parameters_after_meta_to_empty():
    norm = RMSNorm(24, device="meta")
    assert norm.weight.is_meta
    norm = norm.to_empty(device="cpu")
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(24))
    ref = torch.nn.RMSNorm(24, eps=1e-6)
    x = torch.randn(3, 24)
    torch.testing.assert_close(norm(x), ref(x))


@pytest.mark.parametrize("size", [8, [8], (8,), torch.Size([8]), np.int64(8), torch.tensor(8)])
def test_rmsnorm_accepts_an_int_or_a_one_element_shape(size):
    norm = RMSNorm(size)
    assert norm.normalized_shape == (8,) and type(norm.normalized_shape[0]) is int
    assert norm.weight.shape == (8,)


@pytest.mark.parametrize("size, err, needle", [
    ("8", TypeError, "must be an int or a 1-element shape"),
    (True, TypeError, "must be an int or a 1-element shape"),
    (8.0, TypeError, "float"),
    (None, TypeError, "NoneType"),
    (-1, ValueError, ">= 0"),
    ([2, 3], ValueError, "last dim only"),
    ([], ValueError, "last dim only"),
])
def test_rmsnorm_refuses_other_sizes_by_name(size, err, needle):
    with pytest.raises(err, match=needle):
        RMSNorm(size)


def test_rmsnorm_elementwise_affine_as_torch():
    x = torch.randn(3, 5, 24)
    plain = RMSNorm(24, eps=1e-5, elementwise_affine=False)
    ref = torch.nn.RMSNorm(24, eps=1e-5, elementwise_affine=False)
    assert plain.weight is None and plain.elementwise_affine is False and plain.state_dict() == {}
    torch.testing.assert_close(plain(x), ref(x))
    assert RMSNorm(24).elementwise_affine is True
    with pytest.raises(TypeError, match="elementwise_affine"):
        RMSNorm(24, elementwise_affine="yes")


def test_data_and_train_reachable_from_the_package_as_the_readme_lists_them():
    """README's API table lists thrifty.data and thrifty.train.Trainer next to thrifty.ops: after a plain
    `import thrifty` they load on first use (they were AttributeErrors), without loading at import."""
    code = ("import sys, thrifty; assert 'thrifty.train' not in sys.modules; "
            "print(thrifty.train.Trainer.__name__, thrifty.data.prepare_data.__name__, "
            "'data' in dir(thrifty), 'train' in thrifty.__all__)")
    out = _run(["-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Trainer", "prepare_data", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        thrifty.nonexistent  # noqa: B018


@pytest.mark.parametrize("name, gone, extra", [("train", "safetensors", "train"), ("demo", "tqdm", "train"),
                                               ("generate", "tokenizers", "train"), ("quantize", "safetensors", "hf")])
def test_a_subcommand_without_its_extra_says_which_to_install(monkeypatch, capsys, name, gone, extra):
    """A plain `pip install .` has torch and numpy only: train / demo / generate / quantize name the extra they
    need, in one line before any work, instead of a traceback (or, for matplotlib, a failure after training)."""
    import importlib.util

    import thrifty.cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == gone else real(m, *a))
    args = {"train": ["--steps", "1"], "demo": [], "generate": ["somewhere"], "quantize": ["a", "b"]}[name]
    assert thrifty.cli.main([name, *args]) == 2
    err = capsys.readouterr().err
    assert f"thrifty {name}: error: needs {gone} (the '{extra}' extra): pip install 'thrifty[{extra}]'" in err
