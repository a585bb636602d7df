"""The bench harness: CPU timing (thrifty and its baseline timed in interleaved blocks), the rooflines each
row is a share of, where reports are written; the bench scripts' argument checks; gpu_check.sh without a GPU."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from thrifty.bench import common


class _FakeClock:
    """perf_counter for the harness: advances only when a timed function runs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_timeit_pair_interleaves_blocks_and_returns_each_sides_median(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    log = []
    ms = 1 / 1024  # costs in binary fractions: min_time / cost and block_time / cost are exact

    def fa():
        log.append("a")
        clock.now += ms

    def fb():
        log.append("b")
        # a slow phase of the machine in the middle of b's calls: twice the cost
        clock.now += 4 * ms if 20 <= log.count("b") < 24 else 2 * ms

    ta, tb = common.timeit_pair(fa, fb, warmup=2, min_time=50 * ms, block_time=10 * ms)
    timed = log[2 * 2 + 2:]  # after the warm-up pairs and one probe call per side
    assert timed.count("a") == 50 and timed.count("b") == 25  # min_time / cost calls each
    # blocks of block_time / cost calls, alternating: a x10, b x5, a x10, ...
    runs = []
    for name in timed:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    assert [r[0] for r in runs] == ["a", "b"] * 5
    assert all(n == (10 if name == "a" else 5) for name, n in runs)
    assert ta == ms
    assert tb == 2 * ms  # the median ignores the slow phase


def test_timeit_pair_runs_at_least_five_calls_of_a_slow_side(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    counts = {"a": 0, "b": 0}

    def slow():
        counts["a"] += 1
        clock.now += 2.0

    def fast():
        counts["b"] += 1
        clock.now += 0.0001

    ta, tb = common.timeit_pair(slow, fast, warmup=1, min_time=0.3, max_reps=200)
    assert counts["a"] == 1 + 1 + 5  # warm-up, probe, 5 timed
    assert counts["b"] == 1 + 1 + 200  # capped at max_reps
    assert ta == 2.0 and abs(tb - 0.0001) < 1e-12


def _fake_rooflines(monkeypatch, rates):
    """Rooflines without measuring: copy 10 GB/s, matmul FLOP/s per dtype from ``rates``; records the calls."""
    calls = []
    monkeypatch.setattr(common, "measure_copy_bandwidth", lambda device: 10e9)

    def matmul(device, dtype):
        calls.append(dtype)
        return rates[dtype]

    monkeypatch.setattr(common, "measure_matmul_flops", matmul)
    monkeypatch.setattr(common, "timeit_pair", lambda fa, fb: (0.5, 1.0))
    return calls


def test_flops_rows_are_a_share_of_torchs_matmul_in_their_own_dtype(monkeypatch):
    calls = _fake_rooflines(monkeypatch, {torch.float32: 1e12, torch.bfloat16: 4e12})
    b = common.Bench("x", "cpu")
    f32 = b.case(op="a", shape="s", dtype=torch.float32, thrifty=lambda: None, torch_fn=lambda: None, flops=1e12)
    bf = b.case(op="b", shape="s", dtype="bfloat16", thrifty=lambda: None, torch_fn=lambda: None, flops=1e12)
    bf2 = b.case(op="c", shape="s", dtype="bfloat16", thrifty=lambda: None, torch_fn=lambda: None, flops=1e12)
    mem = b.case(op="d", shape="s", dtype="bfloat16", thrifty=lambda: None, torch_fn=lambda: None, bytes=2e9)
    assert calls == [torch.float32, torch.bfloat16]  # each dtype's rate measured once
    assert (f32.pct_roofline, f32.roofline) == (pytest.approx(200.0), "float32 matmul")  # 2 TFLOP/s of 1
    assert (bf.pct_roofline, bf.roofline) == (pytest.approx(50.0), "bfloat16 matmul")  # 2 TFLOP/s of 4
    assert bf2.pct_roofline == pytest.approx(50.0)
    assert (mem.gbps, mem.pct_roofline, mem.roofline) == (pytest.approx(4.0), pytest.approx(40.0), "copy")
    assert f32.speedup == pytest.approx(2.0)
    assert "bfloat16 matmul 4.000 TFLOP/s" in b.table() and "float32 matmul 1.000 TFLOP/s" in b.table()


@pytest.mark.parametrize("quick, name", [(True, "x-cpu-quick.json"), (False, "x-cpu.json")])
def test_a_quick_run_writes_its_own_json_and_says_so(monkeypatch, tmp_path, capsys, quick, name):
    _fake_rooflines(monkeypatch, {torch.float32: 1e12})
    b = common.Bench("x", "cpu", quick=quick)
    b.read_bw = 20e9
    b.case(op="a", shape="s", dtype="float32", thrifty=lambda: None, torch_fn=lambda: None, bytes=1e9)
    path = b.report(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # a quick run never replaces a full run's file
    d = json.loads(path.read_text())
    assert d["quick"] is quick and d["command"] == sys.argv
    assert d["read_bandwidth_Bps"] == 20e9 and d["copy_bandwidth_Bps"] == 10e9
    assert d["cases"][0]["roofline"] == "copy"
    assert ("(quick)" in d["markdown"]) is quick and "read bandwidth 20.0 GB/s" in d["markdown"]


def test_bench_train_refuses_unknown_cases_before_measuring_anything():
    from thrifty.bench import train

    assert train.case_list("lean8, hf,lean8") == ("lean8", "hf")
    r = subprocess.run([sys.executable, "-m", "thrifty.bench.train", "--cases", "default,foo"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown case(s) 'foo'" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="cases must be names from"):
        train.run("cpu", cases=("foo",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's stop when no GPU is visible")
def test_gpu_check_stops_before_building_when_no_gpu_is_visible(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_LOGS=str(tmp_path), OUT=str(tmp_path))
    r = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "NO GPU" in r.stdout and "build (" not in r.stdout


def test_results_go_to_the_checkout_or_out_never_into_a_users_bench_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("THRIFTY_BENCH_OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()  # the user's own folder of that name
    assert common.results_dir() == Path("bench-results")
    (tmp_path / "bench" / "RESULTS.md").write_text("x")
    (tmp_path / "python" / "thrifty").mkdir(parents=True)  # thrifty's checkout
    assert common.results_dir() == Path("bench") / "results"
    monkeypatch.setenv("THRIFTY_BENCH_OUT", str(tmp_path / "elsewhere"))
    assert common.results_dir() == tmp_path / "elsewhere"


def test_bench_out_option_is_where_the_json_goes(tmp_path, monkeypatch):
    import argparse

    import thrifty.bench.cli as bench_cli

    p = argparse.ArgumentParser()
    bench_cli.add_arguments(p)
    args = p.parse_args(["norm", "--quick", "--out", str(tmp_path / "o")])
    assert args.out == tmp_path / "o"
    seen = {}

    class _B:
        def report(self, out_dir=None):
            seen["out"] = out_dir
            return out_dir

    monkeypatch.setattr("thrifty.bench.norm.run", lambda device, quick: _B())
    assert bench_cli.main(args) == 0 and seen["out"] == tmp_path / "o"
