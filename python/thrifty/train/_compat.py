"""The model and optimizers the trainer builds on: thrifty.models and thrifty.optim."""
from __future__ import annotations

from thrifty import optim as _optim
from thrifty.models import Llama, LlamaConfig


def model_api():
    """(Llama, LlamaConfig, is_thrifty): kept as a function so callers need not import models directly."""
    return Llama, LlamaConfig, True


def preset_config(name: str, **overrides) -> LlamaConfig:
    """The `--preset` config (tiny, small) with `overrides` applied; unknown names raise ValueError."""
    return LlamaConfig.preset(name, **overrides)


def make_optimizer(name: str, groups, *, lr: float, betas, weight_decay: float, master_weights: bool,
                   max_grad_norm: float | None = None):
    """thrifty's fused optimizer ``name``; ``max_grad_norm`` clips the global grad norm inside the step
    (one fused norm, no extra pass over the grads); non-finite grads skip the step."""
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
    kw = dict(weight_decay=weight_decay, master_weights=master_weights, max_grad_norm=max_grad_norm,
              skip_nonfinite=True)
    if name == "adamw":
        return _optim.AdamW(groups, lr=lr, betas=betas, **kw)
    if name == "adamw8bit":
        return _optim.AdamW8bit(groups, lr=lr, betas=betas, **kw)
    if name == "lion":
        return _optim.Lion(groups, lr=lr, betas=(0.9, 0.99), **kw)
    raise ValueError(f"--optimizer: expected adamw, adamw8bit or lion, got {name!r}")


def supports_master_weights(name: str) -> bool:
    """bf16 parameters with float32 master copies inside the optimizer."""
    return name in ("adamw", "adamw8bit", "lion")
