"""thrifty: fused C++/CUDA kernels for PyTorch that make LLM training and serving cheap.

Importing thrifty loads the compiled extension ``thrifty._C``, which registers every op
under ``torch.ops.thrifty``; the typed wrappers live in :mod:`thrifty.ops`, drop-in
modules in :mod:`thrifty.nn`.
"""
from __future__ import annotations

import torch

__version__ = "0.1.0"


def _load_extension():
    try:
        from thrifty import _C
    except ImportError as err:
        try:
            from thrifty import _build_info as built
            built_desc = (f"torch {built.TORCH_VERSION}"
                          f"{' with CUDA ' + built.TORCH_CUDA_VERSION if built.WITH_CUDA else ' (CPU only)'}")
        except ImportError:
            built_desc = "an unknown torch (no _build_info.py found: the extension was never built here)"
        running = f"torch {torch.__version__}" + (f" with CUDA {torch.version.cuda}" if torch.version.cuda else " (CPU only)")
        if "THRIFTY_CPU_ISA" in str(err):  # a bad environment setting, not a bad build
            hint = "Set THRIFTY_CPU_ISA to one of scalar, avx2, avx512, avx512_bf16, or unset it."
        elif "THRIFTY_CUDA_QUANT_MMA" in str(err):
            hint = "Set THRIFTY_CUDA_QUANT_MMA to on or off, or unset it."
        else:
            hint = "Rebuild it against the running torch: pip install --no-build-isolation ."
        raise ImportError(
            f"thrifty's compiled extension thrifty._C failed to load: {err}\n"
            f"  built against: {built_desc}\n  running:       {running}\n{hint}") from err
    return _C


_C = _load_extension()

from thrifty import ops  # noqa: E402  (registers fake and autograd implementations)
from thrifty import nn  # noqa: E402
from thrifty import optim  # noqa: E402
from thrifty import quant  # noqa: E402
from thrifty import models  # noqa: E402
from thrifty.models.patch import patch_hf  # noqa: E402
from thrifty._info import info, info_dict, info_text  # noqa: E402

__all__ = ["ops", "nn", "optim", "quant", "models", "patch_hf", "info", "info_dict", "info_text", "__version__"]
