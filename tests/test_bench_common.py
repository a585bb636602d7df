"""The bench harness's CPU timing: thrifty and its baseline timed in interleaved blocks."""
import types

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
