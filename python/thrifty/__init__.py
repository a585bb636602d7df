"""thrifty: fused C++/CUDA kernels for PyTorch that make LLM training and serving cheap.

Importing thrifty loads the compiled extension ``thrifty._C``, which registers every op
under ``torch.ops.thrifty``; the typed wrappers live in :mod:`thrifty.ops`, drop-in
modules in :mod:`thrifty.nn`.
"""
from __future__ import annotations

import torch

__version__ = "0.1.0"


def _missing_extension_detail() -> str | None:
    """Why ``thrifty._C`` cannot be found, or None when a loadable-looking file is there.

    Without this, Python reports a missing compiled submodule as "cannot import name '_C' from
    partially initialized module 'thrifty' (most likely due to a circular import)", which
    sends the reader after an import cycle that does not exist."""
    import importlib.machinery
    import os

    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    try:
        names = sorted(os.listdir(pkg_dir))
    except OSError:
        names = []
    if any(n == "_C" + s for n in names for s in suffixes):
        return None
    others = [n for n in names if n.startswith("_C.") and n.endswith((".so", ".pyd", ".dylib"))]
    detail = f"no compiled extension _C{suffixes[0]} in {pkg_dir}"
    if others:
        detail += f" (found {', '.join(others)}: built for another Python or platform)"
    else:
        detail += " (the extension was not built or not installed here)"
    return detail


def _load_extension():
    try:
        from thrifty import _C
    except ImportError as err:
        missing = _missing_extension_detail()
        reason = missing if missing is not None else str(err)
        try:
            from thrifty import _build_info as built
            built_desc = (f"torch {built.TORCH_VERSION}"
                          f"{' with CUDA ' + built.TORCH_CUDA_VERSION if built.WITH_CUDA else ' (CPU only)'}")
        except ImportError:
            built_desc = "an unknown torch (no _build_info.py found: the extension was never built here)"
        running = f"torch {torch.__version__}" + (f" with CUDA {torch.version.cuda}" if torch.version.cuda else " (CPU only)")
        if missing is not None:
            hint = ("Build and install it: pip install --no-build-isolation . "
                    "(in a source checkout used through PYTHONPATH: tools/build_inplace.sh)")
        elif "THRIFTY_CPU_ISA" in reason:  # a bad environment setting, not a bad build
            hint = "Set THRIFTY_CPU_ISA to one of scalar, avx2, avx512, avx512_bf16, or unset it."
        elif "THRIFTY_CPU_BF16_DOT" in reason:
            hint = "Set THRIFTY_CPU_BF16_DOT to one of auto, on, off, or unset it."
        elif "THRIFTY_CUDA_QUANT_MMA" in reason:
            hint = "Set THRIFTY_CUDA_QUANT_MMA to on or off, or unset it."
        else:
            hint = "Rebuild it against the running torch: pip install --no-build-isolation ."
        message = (f"thrifty's compiled extension thrifty._C failed to load: {reason}\n"
                   f"  built against: {built_desc}\n  running:       {running}\n{hint}")
        if missing is not None:
            # Python's own error for a missing compiled submodule blames "a circular import": leave it out.
            raise ImportError(message) from None
        raise ImportError(message) from err
    return _C


_C = _load_extension()

from thrifty import ops  # noqa: E402  (registers fake and autograd implementations)
from thrifty import nn  # noqa: E402
from thrifty import optim  # noqa: E402
from thrifty import quant  # noqa: E402
from thrifty import models  # noqa: E402
from thrifty.models.patch import patch_hf  # noqa: E402
from thrifty._info import info, info_dict, info_text  # noqa: E402

__all__ = ["ops", "nn", "optim", "quant", "models", "data", "train", "patch_hf", "info", "info_dict", "info_text",
           "__version__"]

# thrifty.data and thrifty.train load on first use (they import the optional tokenizers / datasketch / tqdm):
# `import thrifty; thrifty.train.Trainer(...)` works, and `import thrifty` alone stays light.
_LAZY_SUBMODULES = ("data", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"thrifty.{name}")
    raise AttributeError(f"module 'thrifty' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
