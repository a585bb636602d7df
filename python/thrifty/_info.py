"""`thrifty info`: what was built, what runs, what the machine offers."""
from __future__ import annotations

import os
import platform

import torch


def info_dict() -> dict:
    from thrifty import __version__, _C

    built = _C.build_info()
    d = {
        "thrifty": __version__,
        "git": built["git"],
        "torch_built_against": built["torch_version"],
        "torch_running": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa_compiled": built["cpu_isa_compiled"],
        "cpu_isa_detected": _C.cpu_isa_detected(),
        "cpu_isa_in_use": _C.cpu_isa(),
        "cpu_isa_env": os.environ.get("THRIFTY_CPU_ISA", ""),
        # At avx512_bf16: whether bf16 attention / quant_linear use VDPBF16PS (off on AMX CPUs, where FMA is faster).
        "cpu_bf16_dot": _C.cpu_uses_bf16_dot(),
        "threads": torch.get_num_threads(),
        # Measured, not assumed: a build without OpenMP would run every CPU kernel on one thread.
        "threads_in_kernels": _C.parallel_threads_used(),
        "cuda_built": built["cuda"],
        "cuda_version_built": built["cuda_version"],
        "cuda_archs": built["cuda_archs"],
        # Decode quant kernels on tensor cores (THRIFTY_CUDA_QUANT_MMA); None without CUDA.
        "cuda_quant_mma": _C.cuda_quant_mma() if built["cuda"] else None,
        "fast_build": built["fast_build"],
        # A test build whose avx512 levels are AVX2 code emulating AVX-512 (slow; not for use).
        "emulated_avx512": built.get("emulated_avx512", False),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            d["gpus"].append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return d


def info_text() -> str:
    """The human-readable summary of the build and the machine that :func:`info` prints."""
    d = info_dict()
    lines = [
        f"thrifty {d['thrifty']} ({d['git']})",
        f"torch        built against {d['torch_built_against']}, running {d['torch_running']}",
        f"python       {d['python']}",
        f"CPU ISA      detected {d['cpu_isa_detected']}, in use {d['cpu_isa_in_use']}"
        f"{' (THRIFTY_CPU_ISA=' + d['cpu_isa_env'] + ')' if d['cpu_isa_env'] else ''}; compiled {d['cpu_isa_compiled']}"
        f"{' (avx512 levels EMULATED on AVX2 with SIMDe: a test build)' if d['emulated_avx512'] else ''}"
        + ("; bf16 attention / quant_linear on "
           + ("VDPBF16PS" if d["cpu_bf16_dot"] else "float32 FMA (faster than VDPBF16PS on AMX-BF16 CPUs)")
           if d["cpu_isa_in_use"] == "avx512_bf16" else ""),
        f"threads      {d['threads']} (a thrifty CPU kernel loop ran on {d['threads_in_kernels']})",
        "CUDA         " + (f"built with CUDA {d['cuda_version_built']} for {d['cuda_archs']}; decode quant kernels "
                            f"on tensor cores {'on' if d['cuda_quant_mma'] else 'off (THRIFTY_CUDA_QUANT_MMA)'}"
                            if d["cuda_built"] else "not built (CPU-only extension)"),
        "GPUs seen    " + (", ".join(d["gpus"]) if d["gpus"] else "none"),
    ]
    return "\n".join(lines)


def info(file=None) -> str:
    """Prints a human-readable summary of the build and the machine (to ``file``, default stdout) and
    returns it. (The REPL echoes the returned string after the printout; ``_ = thrifty.info()`` or
    :func:`info_text` / :func:`info_dict` avoid that. Returning it keeps ``text = thrifty.info()`` working.)"""
    text = info_text()
    print(text, file=file)
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the fields as JSON")


def main(args) -> int:
    if args.json:
        import json

        print(json.dumps(info_dict(), indent=1))
    else:
        info()
    return 0
