"""LoRA: low-rank adapters on chosen nn.Linear layers; only the adapters train; merged on export.

    apply_lora(model, rank=8, targets=("q_proj", "v_proj"))   # replaces those layers in place
    merged = merged_state_dict(model)                         # base + scale * B @ A, original names
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x @ A.T) @ B.T, with A (r, in) Kaiming-uniform, B (out, r) zero, so a
    fresh adapter leaves the model unchanged. The base layer is frozen. Adapters are float32."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"lora rank: expected a positive integer, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):  # so code that reads .weight (tied checks, shapes) still works
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        dt = y.dtype
        a = self.lora_A.to(dt)
        b = self.lora_B.to(dt)
        return y + (self.dropout(x).to(dt) @ a.t() @ b.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        return (w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype)


def apply_lora(model: nn.Module, rank: int, targets=DEFAULT_TARGETS, alpha: float | None = None,
               dropout: float = 0.0) -> list[str]:
    """Freezes every parameter of ``model`` and wraps the nn.Linear layers whose name ends with one
    of ``targets`` in :class:`LoRALinear`. Returns the wrapped names; raises if none matched."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"--lora-targets: no nn.Linear layer named {list(targets)} in the model; its linear layers are {linears}")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in lora_modules(model).items() for k in ("lora_A", "lora_B")}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    mods = lora_modules(model)
    for key, t in sd.items():
        n, _, k = key.rpartition(".")
        if n not in mods:
            raise ValueError(f"LoRA state: the model has no adapter {n!r} (rank or targets changed?)")
        getattr(mods[n], k).data.copy_(t)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight, under the original
    (un-wrapped) parameter names, ready for save_pretrained / transformers."""
    mods = lora_modules(model)
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_A" in k or ".lora_B" in k:
            continue
        out[k.replace(".base.", ".")] = v
    for n, m in mods.items():
        out[f"{n}.weight"] = m.merged_weight().detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replaces every LoRALinear by a plain nn.Linear holding the merged weight (in place)."""
    for n, m in list(lora_modules(model).items()):
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = m.base
        lin.weight.data.copy_(m.merged_weight())
        setattr(parent, child, lin)
    return model
