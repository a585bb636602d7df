"""LoRA: low-rank adapters on chosen nn.Linear layers; only the adapters train; merged on export.

    apply_lora(model, rank=8, targets=("q_proj", "v_proj"))   # replaces those layers in place
    merged = merged_state_dict(model)                         # base + scale * B @ A, original names

QLoRA: ``quantize_base(model, bits=4)`` first turns the frozen decoder linears into
thrifty.nn.QuantLinear (int4 group-wise, thrifty's W4A16 kernels), then ``apply_lora`` puts the
adapters on top; merging adds B @ A to the dequantized base weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + scale * (x @ A.T) @ B.T, with A (r, in) Kaiming-uniform, B (out, r) zero, so a
    fresh adapter leaves the model unchanged. The base layer is frozen. Adapters are float32."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"lora rank: expected a positive integer, got {rank!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        dev = next(iter(base.buffers() if _is_quant(base) else base.parameters())).device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):  # so code that reads .weight (tied checks, shapes) still works
        return self.base.dequantize() if _is_quant(self.base) else self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):
        y = self.base(x)
        dt = y.dtype
        a = self.lora_A.to(dt)
        b = self.lora_B.to(dt)
        return y + (self.dropout(x).to(dt) @ a.t() @ b.t()) * self.scale

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """base + scale * B @ A, in the base weight's dtype (a quantized base: its dequantized weight, in
        ``dtype`` or float32)."""
        if _is_quant(self.base):
            w = self.base.dequantize()
            out_dtype = dtype or torch.float32
        else:
            w = self.base.weight
            out_dtype = dtype or w.dtype
        return (w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(out_dtype)


def _is_quant(m: nn.Module) -> bool:
    from thrifty.nn.quant import QuantLinear
    return isinstance(m, QuantLinear)


def _targets(targets) -> tuple:
    if isinstance(targets, str):
        targets = targets.split(",")
    out = tuple(t.strip() for t in targets if t and t.strip())
    if not out:
        raise ValueError("--lora-targets: expected at least one layer name (q_proj, v_proj, ...)")
    return out


def _pick_group_size(in_features: int, group_size: int) -> int | None:
    """``group_size`` when it divides in_features, else the largest smaller one of 128, 64, 32 that does."""
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"--lora-group-size: expected a positive multiple of 32, got {group_size}")
    for g in (group_size, *(x for x in (128, 64, 32) if x < group_size)):
        if in_features % g == 0:
            return g
    return None


def quantize_base(model: nn.Module, bits: int = 4, group_size: int = 64, skip=("lm_head",)) -> list[str]:
    """QLoRA's frozen base: replaces every nn.Linear of ``model`` (except ``skip``, the LM head by default,
    and nn.MultiheadAttention's out_proj)
    by a frozen thrifty.nn.QuantLinear (bits=4: group-wise int4, ``group_size`` or the largest of 128/64/32
    that divides the layer's in_features; bits=8: int8 per channel), in place. Returns the names replaced;
    a layer no group size fits stays in floating point."""
    from thrifty.nn.quant import QuantLinear
    from thrifty.quant.model import _set_module, quantizable_linears

    if bits not in (4, 8):
        raise ValueError(f"--lora-base-bits: expected 4 or 8 (or 16 for a floating-point base), got {bits}")
    names = []
    for n in quantizable_linears(model, skip):  # quantize_model's choice of layers (out_proj stays float)
        m = model.get_submodule(n)
        g = _pick_group_size(m.in_features, group_size) if bits == 4 else -1
        if g is None:
            continue
        _set_module(model, n, QuantLinear.from_float(m, bits=bits, group_size=g if bits == 4 else 128))
        names.append(n)
    if not names:
        raise ValueError(f"--lora-base-bits {bits}: no linear layer of the model could be quantized "
                         f"(in_features must be a multiple of 32)")
    return names


def apply_lora(model: nn.Module, rank: int, targets=DEFAULT_TARGETS, alpha: float | None = None,
               dropout: float = 0.0) -> list[str]:
    """Freezes every parameter of ``model`` and wraps the nn.Linear (or QuantLinear: QLoRA) layers whose
    name ends with one of ``targets`` (a sequence or a comma-separated string) in :class:`LoRALinear`.
    Returns the wrapped names; raises if none matched."""
    targets = _targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or _is_quant(m)) and any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:  # a typo in a list ("q_proj,v_porj") must not silently leave that layer without an adapter
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) or _is_quant(m)})
        what = f"no nn.Linear layer named {list(targets)}" if not names else \
            f"{unmatched} matches no nn.Linear layer"
        raise ValueError(f"--lora-targets: {what} in the model; its linear layers are {linears}")
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
        p = getattr(mods[n], k)
        if hasattr(p, "device_mesh") and hasattr(p, "placements"):  # an FSDP2 shard (DTensor): shard t the same way
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements)
        p.data.copy_(t)


_QUANT_KEYS = ("qweight", "scales", "zeros", "perm", "smooth")


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n),
                torch.float32)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight, under the original
    (un-wrapped) parameter names, ready for save_pretrained / transformers. Quantized (QLoRA) layers come
    out dequantized, in ``dtype`` (default: the dtype of the model's floating-point parameters)."""
    from thrifty.nn.quant import QuantLinear

    dtype = dtype or _float_dtype(model)
    mods = lora_modules(model)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_A" in k or ".lora_B" in k:
            continue
        owner, _, leaf = k.rpartition(".")
        if owner in quant and leaf in _QUANT_KEYS:
            continue
        out[k.replace(".base.", ".")] = v
    for n, m in quant.items():
        if n.endswith(".base") and n[: -len(".base")] in mods:
            continue
        out[f"{n}.weight"] = m.dequantize().to(dtype)
        if m.bias is not None:
            out[f"{n}.bias"] = m.bias.detach().to(dtype)
    for n, m in mods.items():
        out[f"{n}.weight"] = m.merged_weight(dtype if _is_quant(m.base) else None).detach()
        if _is_quant(m.base) and m.base.bias is not None:
            out[f"{n}.bias"] = m.base.bias.detach().to(dtype)
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replaces every LoRALinear by a plain nn.Linear holding the merged weight (in place); a quantized
    (QLoRA) base becomes an nn.Linear with the dequantized weight + B @ A."""
    dtype = _float_dtype(model)
    for n, m in list(lora_modules(model).items()):
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if _is_quant(m.base):
            b = m.base
            lin = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.qweight.device,
                            dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(m.merged_weight(dtype))
                if b.bias is not None:
                    lin.bias.copy_(b.bias)
        else:
            lin = m.base
            lin.weight.data.copy_(m.merged_weight())
        setattr(parent, child, lin)
    return model
