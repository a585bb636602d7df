"""Benchmark harness shared by every kernel family (thrifty.bench.<family>, run by
`thrifty bench [family...]` or the thin scripts bench/<family>.py).

Each family script builds a list of cases, times thrifty against the PyTorch baseline in
the same process (warm-up, median of many runs; on the CPU the two sides' calls interleaved,
:func:`timeit_pair`), and calls :func:`report`, which prints
a markdown table and writes JSON under bench/results/. Rooflines (copy bandwidth and a
large matmul) are measured in the same run, so ratios hold even when absolute times on
shared CPUs drift.

    from thrifty.bench.common import Bench
    def run(device, quick=False) -> Bench:
        b = Bench("norm", device)
        b.case(op="rms_norm fwd", shape="4096x4096", dtype="float32",
               thrifty=lambda: ..., torch_fn=lambda: ..., bytes=..., flops=None)
        return b
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from thrifty.bench._env import allocator_description, reexec_with_bench_env


def results_dir() -> Path:
    """$THRIFTY_BENCH_OUT, else bench/results when the current directory is thrifty's checkout (its
    bench/RESULTS.md beside python/thrifty), else ./bench-results (a user's own bench/ folder is left alone)."""
    if os.environ.get("THRIFTY_BENCH_OUT"):
        return Path(os.environ["THRIFTY_BENCH_OUT"])
    if Path("bench/RESULTS.md").is_file() and Path("python/thrifty").is_dir():
        return Path("bench") / "results"
    return Path("bench-results")


OUT_HELP = ("directory for the JSON results (default: $THRIFTY_BENCH_OUT, else bench/results in thrifty's checkout, "
            "else ./bench-results; a --quick run writes <family>-<device>-quick.json)")


def bench_device(value: str) -> str:
    """argparse type of ``--device``: ``value`` when benchmarks can run there, else
    argparse.ArgumentTypeError saying why (a usage error: one line, exit code 2, no traceback)."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device (expected cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"benchmarks run on cpu or cuda, not {value!r}")
    if dev.type == "cuda":
        import thrifty

        if not thrifty._C.build_info()["cuda"]:
            fix = ("rebuild with THRIFTY_CUDA=on" if torch.version.cuda else
                   f"the installed torch {torch.__version__} is a CPU-only build: install a CUDA build of torch, then "
                   "rebuild thrifty")
            raise argparse.ArgumentTypeError(f"{value!r}: this thrifty was built without CUDA kernels ({fix})")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is visible")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return value


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reps(once: float, min_time: float, max_reps: int) -> int:
    """Timed calls for a function taking ``once`` seconds: about ``min_time`` in all, 5 to ``max_reps``."""
    return int(min(max_reps, max(5, min_time / once)))


def timeit(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 3,
           reps: int | None = None, min_time: float = 0.3, max_reps: int = 200) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls.

    With ``reps=None`` the repetition count is chosen so the timed loop runs about
    ``min_time`` seconds (at least 5, at most ``max_reps``). On CUDA each call is timed
    with events.
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    if reps is None:
        t0 = time.perf_counter()
        fn()
        sync(dev)
        once = max(time.perf_counter() - t0, 1e-6)
        reps = _reps(once, min_time, max_reps)
    times = []
    if dev.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_pair(fa: Callable[[], object], fb: Callable[[], object], *, warmup: int = 3,
                min_time: float = 0.3, max_reps: int = 200, block_time: float = 0.05) -> tuple[float, float]:
    """Median seconds per call of ``fa`` and of ``fb`` on the CPU, their calls interleaved in blocks
    of about ``block_time`` seconds (each side at least 5 and at most ``max_reps`` calls, about
    ``min_time`` seconds in all).

    Why interleaved: on a shared box the rate of the machine can change for seconds at a time (the
    2-vCPU CI box swings between ~0.40 and ~0.21 TFLOP/s of bf16 matmul from one second to the next,
    as the host moves its vCPUs). Timing one side after the other lets such a swing land on one side
    only and skew the ratio; interleaved blocks expose both sides to the same machine. Calls within a
    block run back to back, so each side keeps its warm caches as when timed alone.
    """
    for _ in range(warmup):
        fa()
        fb()
    sides = []
    for fn in (fa, fb):
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-6)
        reps = _reps(once, min_time, max_reps)
        sides.append([fn, reps, max(1, min(reps, int(block_time / once))), []])
    while any(len(times) < reps for _, reps, _, times in sides):
        for fn, reps, block, times in sides:
            for _ in range(min(block, reps - len(times))):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return statistics.median(sides[0][3]), statistics.median(sides[1][3])


def timeit_graphed(fn: Callable[[], object], device: torch.device | str, *, calls: int = 20) -> float:
    """Median seconds per call of ``fn`` on a GPU with the host's launch cost taken out: ``calls`` calls
    captured back to back in one CUDA graph, the graph replayed (how serving engines run decode steps).
    Small decode kernels run for less time than the Python and dispatcher work that launches them
    eagerly, so eager timing measures the host there; this measures the kernels."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"timeit_graphed: CUDA graphs need a cuda device, got {dev}")
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up off the capture (lazy inits, allocator pools)
        for _ in range(3):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timeit(graph.replay, dev) / calls


def measure_copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 512 * 2**20, tries: int = 3) -> float:
    """Bytes/s of a large tensor copy (bytes read + bytes written), far larger than any cache: the best of
    ``tries`` medians (a shared box's bandwidth swings by 2x from one second to the next, and a roofline is
    what the machine can do). A copy's destination is also read into the cache before it is written
    (write-allocate), which an in-place update does not pay: such ops can pass 100% of this figure."""
    dev = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    return 2 * n * 4 / best_time(lambda: dst.copy_(src), dev, tries)


def best_time(fn: Callable[[], object], device: torch.device | str, tries: int = 3) -> float:
    """The best of ``tries`` median times of ``fn`` (about 0.5 s each, one warm-up): a roofline measurement,
    what the machine can do between a shared box's slow spells."""
    return min(timeit(fn, device, warmup=2 if i == 0 else 0, min_time=0.5, max_reps=20) for i in range(tries))


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         n: int | None = None) -> float:
    """FLOP/s of a large square matmul through torch in ``dtype`` (the compute roofline of this run for
    work in that dtype)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = timeit(lambda: a @ b, dev, warmup=2, min_time=0.5, max_reps=20)
    return 2 * n**3 / t


def machine_description(device: torch.device | str = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import thrifty

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, ISA {thrifty._C.cpu_isa()}"


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    thrifty_s: float
    torch_s: float | None
    speedup: float | None
    bytes: float | None = None
    flops: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_roofline: float | None = None
    roofline: str | None = None  # what pct_roofline is a share of: "copy" or "<dtype> matmul"
    baseline: str = "torch"
    extra: dict = field(default_factory=dict)


class Bench:
    """Collects timed cases for one family and reports them with this run's rooflines."""

    def __init__(self, family: str, device: torch.device | str = "cpu", *, rooflines: bool = True,
                 matmul_dtype: torch.dtype | None = None, quick: bool = False):
        """``matmul_dtype``: the matmul rate measured up front (bfloat16 on CUDA, float32 on the CPU by
        default); rows in another dtype get that dtype's rate, measured when first needed (with
        ``rooflines``). ``quick``: the run uses the smaller cases (recorded, and written to its own JSON)."""
        self.family = family
        self.device = torch.device(device)
        self.quick = quick
        self.cases: list[Case] = []
        self.rooflines = rooflines
        self.read_bw: float | None = None  # a family that measures a streaming read rate sets it (quant)
        self.copy_bw = measure_copy_bandwidth(self.device) if rooflines else None
        self.matmul_flops = None
        self.matmul_rates: dict[str, float] = {}  # dtype name -> FLOP/s of torch's large matmul in this run
        mdt = matmul_dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.matmul_dtype = str(mdt).replace("torch.", "")
        if rooflines:
            self.matmul_flops = self.matmul_rate(self.matmul_dtype)

    def matmul_rate(self, dtype: str) -> float | None:
        """torch's large-matmul FLOP/s in ``dtype`` (a float dtype name) in this run, measured once; None
        without rooflines or for a dtype torch has no matmul for."""
        if dtype not in self.matmul_rates:
            if not self.rooflines or not isinstance(getattr(torch, dtype, None), torch.dtype) \
                    or not getattr(torch, dtype).is_floating_point:
                return None
            self.matmul_rates[dtype] = measure_matmul_flops(self.device, getattr(torch, dtype))
            print(f"  roofline: {dtype} matmul {self.matmul_rates[dtype] / 1e12:.3f} TFLOP/s", flush=True)
        return self.matmul_rates[dtype]

    def case(self, *, op: str, shape: str, dtype: str | torch.dtype, thrifty: Callable[[], object],
             torch_fn: Callable[[], object] | None = None, bytes: float | None = None,
             flops: float | None = None, baseline: str = "torch", graphed: bool = False, **extra) -> Case:
        """Times ``thrifty`` and ``torch_fn`` (same process, same inputs) and records a row.

        ``bytes``: the fewest bytes the op must move (each input read once, each output
        written once): gives GB/s and % of copy bandwidth. ``flops``: gives TFLOP/s and %
        of torch's matmul rate in ``dtype``, measured in this run; a kernel faster than
        torch's own matmul in that dtype reads over 100%. Give
        whichever bounds the op. ``graphed`` (CUDA only): both sides timed inside CUDA
        graphs (:func:`timeit_graphed`), recorded as extra["graphed"].
        """
        if graphed:
            t = timeit_graphed(thrifty, self.device)
            tt = timeit_graphed(torch_fn, self.device) if torch_fn is not None else None
            extra["graphed"] = True
        elif torch_fn is not None and self.device.type == "cpu":
            t, tt = timeit_pair(thrifty, torch_fn)  # interleaved: see timeit_pair
        else:
            t = timeit(thrifty, self.device)
            tt = timeit(torch_fn, self.device) if torch_fn is not None else None
        c = Case(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), thrifty_s=t, torch_s=tt,
                 speedup=(tt / t) if tt else None, bytes=bytes, flops=flops, baseline=baseline, extra=extra)
        self._rates(c)
        self.cases.append(c)
        print(f"  {op:28s} {c.shape:24s} {c.dtype:9s} thrifty {t * 1e3:9.3f} ms"
              + (f"  {baseline} {tt * 1e3:9.3f} ms  x{c.speedup:5.2f}" if tt else ""), flush=True)
        return c

    def _rates(self, c: Case) -> None:
        """Fills ``c``'s GB/s, TFLOP/s and % roofline from its bytes / flops and time."""
        t = c.thrifty_s
        if c.bytes:
            c.gbps = c.bytes / t / 1e9
            if self.copy_bw:
                c.pct_roofline, c.roofline = 100 * c.bytes / t / self.copy_bw, "copy"
        if c.flops:
            c.tflops = c.flops / t / 1e12
            rate = None if c.bytes else self.matmul_rate(c.dtype)  # a byte-bound row needs no matmul roofline
            if rate:
                c.pct_roofline, c.roofline = 100 * c.flops / t / rate, f"{c.dtype} matmul"

    def table(self) -> str:
        hdr = ("| op | shape | dtype | thrifty ms | baseline ms | speedup | GB/s | TFLOP/s | % roofline |\n"
               "|---|---|---|---|---|---|---|---|---|")
        rows = []
        for c in self.cases:
            rows.append(
                f"| {c.op} | {c.shape} | {c.dtype} | {c.thrifty_s * 1e3:.3f} | "
                + (f"{c.torch_s * 1e3:.3f} ({c.baseline})" if c.torch_s else "-") + " | "
                + (f"{c.speedup:.2f}x" if c.speedup else "-") + " | "
                + (f"{c.gbps:.1f}" if c.gbps else "-") + " | "
                + (f"{c.tflops:.3f}" if c.tflops else "-") + " | "
                + (f"{c.pct_roofline:.0f}%" if c.pct_roofline else "-") + " |")
        roof = []
        if self.copy_bw:
            roof.append(f"copy bandwidth {self.copy_bw / 1e9:.1f} GB/s")
        if self.read_bw:
            roof.append(f"read bandwidth {self.read_bw / 1e9:.1f} GB/s")
        roof += [f"{dt} matmul {r / 1e12:.3f} TFLOP/s" for dt, r in self.matmul_rates.items()]
        return (f"### {self.family}{' (quick)' if self.quick else ''} on {machine_description(self.device)}\n"
                f"Rooflines measured in this run: {', '.join(roof) or 'not measured'} (% roofline: of the copy "
                f"bandwidth for rows given in GB/s, else of torch's matmul in the row's dtype)\n"
                f"Allocator: {allocator_description()}\n\n" + hdr + "\n" + "\n".join(rows))

    def report(self, out_dir: Path | None = None) -> Path:
        """Prints the markdown table and writes <results_dir>/<family>-<device>.json (a quick run:
        <family>-<device>-quick.json, so it never replaces a full run's file)."""
        text = self.table()
        print("\n" + text + "\n")
        out_dir = Path(out_dir) if out_dir else results_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.family}-{self.device.type}{'-quick' if self.quick else ''}.json"
        payload = {
            "family": self.family,
            "quick": self.quick,
            "command": sys.argv,
            "machine": machine_description(self.device),
            "device": self.device.type,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "allocator": allocator_description(),
            "copy_bandwidth_Bps": self.copy_bw,
            "read_bandwidth_Bps": self.read_bw,
            "matmul_flops": self.matmul_flops,
            "matmul_dtype": self.matmul_dtype,
            "matmul_flops_by_dtype": self.matmul_rates,
            "cases": [asdict(c) for c in self.cases],
            "markdown": text,
        }
        path.write_text(json.dumps(payload, indent=1))
        return path


def main(run, argv: list[str] | None = None) -> None:
    """Entry point of a bench/<family>.py script: parses --device/--quick, runs, reports."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", type=bench_device, help="cpu or cuda[:N]")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    ap.add_argument("--out", type=Path, help=OUT_HELP)
    args = ap.parse_args(argv)
    if argv is None:  # a script run as a program re-executes itself; a caller passing argv is not replaced
        reexec_with_bench_env(sys.argv)
    run(torch.device(args.device), quick=args.quick).report(args.out)
