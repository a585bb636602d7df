"""The model and optimizer the trainer builds on: thrifty.models / thrifty.optim when this build has
them, otherwise a plain-PyTorch stand-in model and torch.optim.AdamW (said once in the log)."""
from __future__ import annotations

import torch


def model_api():
    """(Llama, LlamaConfig, is_thrifty)."""
    try:
        from thrifty.models import Llama, LlamaConfig
        return Llama, LlamaConfig, True
    except ImportError:
        from thrifty.train._standin_model import Llama, LlamaConfig
        return Llama, LlamaConfig, False


def preset_config(name: str, **overrides):
    Llama, LlamaConfig, is_thrifty = model_api()
    base = None
    if is_thrifty and hasattr(LlamaConfig, "preset"):
        return LlamaConfig.preset(name, **overrides)
    if is_thrifty:
        import thrifty.models as tm
        for attr in ("preset_config", "get_preset"):
            if hasattr(tm, attr):
                base = getattr(tm, attr)(name)
                break
        if base is None and hasattr(tm, "PRESETS"):
            base = tm.PRESETS[name]
        if base is None and hasattr(LlamaConfig, "preset"):
            base = LlamaConfig.preset(name)
    if base is None:
        from thrifty.train._standin_model import PRESETS
        if name not in PRESETS:
            raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {name!r}")
        base = dict(PRESETS[name])
    if not isinstance(base, dict):
        base = base.to_dict() if hasattr(base, "to_dict") else dict(vars(base))
    base = {**base, **overrides}
    return LlamaConfig(**{k: v for k, v in base.items() if k not in ("architectures", "model_type", "hidden_act")}) \
        if not hasattr(LlamaConfig, "from_dict") else LlamaConfig.from_dict(base)


def thrifty_optim():
    try:
        import thrifty.optim as to
        return to
    except ImportError:
        return None


def make_optimizer(name: str, groups, *, lr: float, betas, weight_decay: float, master_weights: bool):
    to = thrifty_optim()
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
    if name == "adamw":
        if to is not None:
            return to.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, master_weights=master_weights)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name in ("adamw8bit", "lion"):
        if to is None:
            raise ValueError(f"--optimizer {name} needs thrifty.optim, which this build lacks; use --optimizer adamw")
        if name == "adamw8bit":
            return to.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay, master_weights=master_weights)
        return to.Lion(groups, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, master_weights=master_weights)
    raise ValueError(f"--optimizer: expected adamw, adamw8bit or lion, got {name!r}")


def supports_master_weights(name: str) -> bool:
    """bf16 parameters with float32 master copies inside the optimizer (thrifty.optim.AdamW)."""
    return name in ("adamw", "adamw8bit", "lion") and thrifty_optim() is not None
