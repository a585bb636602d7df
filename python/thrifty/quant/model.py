"""Whole-model quantization: replace nn.Linear layers by QuantLinear, save and load with safetensors."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from thrifty.quant.formats import FORMAT_VERSION

FORMAT_NAME = "thrifty-quant"


@dataclass
class QuantConfig:
    """bits 8 or 4; group_size for bits=4; method "rtn" or "gptq"; act_bits 16 or 8 (W8A8);
    skip: layer names (or name suffixes) left in floating point (the LM head by default)."""
    bits: int = 4
    group_size: int = 128
    method: str = "rtn"
    act_bits: int = 16
    skip: tuple[str, ...] = ("lm_head",)
    damp: float = 0.01
    act_order: bool = True

    def __post_init__(self):
        if self.skip is None:  # None: quantize every nn.Linear (as the dict form's skip=None)
            self.skip = ()
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        try:
            self.skip = tuple(self.skip)
        except TypeError:
            raise TypeError(f"quantize_model: config 'skip' must be a layer name or a list of them, got "
                            f"{type(self.skip).__name__} ({self.skip!r})") from None
        if not all(isinstance(n, str) for n in self.skip):
            raise TypeError(f"quantize_model: config 'skip' must hold layer names (str), got {self.skip!r}")
        for name in ("bits", "group_size", "act_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"quantize_model: config '{name}' must be an int, got {type(v).__name__} ({v!r})")
        if self.bits not in (4, 8):
            raise ValueError(f"quantize_model: config 'bits' must be 4 or 8, got {self.bits}")
        if self.act_bits not in (8, 16):
            raise ValueError(f"quantize_model: config 'act_bits' must be 16 or 8, got {self.act_bits}")
        if self.act_bits == 8 and self.bits != 8:
            raise ValueError(f"quantize_model: config act_bits=8 (W8A8) needs bits=8, got bits={self.bits}")
        if self.bits == 4 and (self.group_size <= 0 or self.group_size % 32):
            raise ValueError(f"quantize_model: config 'group_size' must be a positive multiple of 32 for bits=4, "
                             f"got {self.group_size}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"quantize_model: config 'method' must be 'rtn' or 'gptq', got {self.method!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp) \
                or not self.damp >= 0:
            raise ValueError(f"quantize_model: config 'damp' must be >= 0, got {self.damp}")

    @classmethod
    def make(cls, config) -> "QuantConfig":
        if isinstance(config, QuantConfig):
            return config
        if isinstance(config, dict):
            unknown = set(config) - set(cls.__dataclass_fields__) - {"modules_to_not_convert", "skip_modules"}
            if unknown:
                raise ValueError(f"quantize_model: unknown config keys {sorted(unknown)}; "
                                 f"known: {sorted(cls.__dataclass_fields__)}")
            c = dict(config)
            for alias in ("modules_to_not_convert", "skip_modules"):  # Hugging Face quantizers' names for skip
                if alias in c:
                    if "skip" in c:
                        raise ValueError(f"quantize_model: config has both 'skip' and {alias!r}")
                    c["skip"] = c.pop(alias)
            if "skip" in c:
                c["skip"] = tuple(c["skip"]) if c["skip"] is not None else ()
            return cls(**c)
        raise TypeError(f"quantize_model: config must be a QuantConfig or a dict, got {type(config).__name__}")


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantizable_linears(model: nn.Module, skip) -> list[str]:
    """Names of the nn.Linear layers of ``model`` a quantizer replaces: all but those named in ``skip``
    (a name or a dotted suffix; a layer shared under several names is skipped when any of them is) and
    NonDynamicallyQuantizableLinear (nn.MultiheadAttention's out_proj, whose
    weight the attention code reads directly; torch.ao's quantizers keep it in floating point too)."""
    aliases = _aliases(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and not isinstance(m, NonDynamicallyQuantizableLinear)
            and not any(_skipped(a, skip) for a in aliases.get(id(m), [n]))]


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name it is reachable under (named_modules lists a shared module once only)."""
    out: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(n)
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _run_calibration(model: nn.Module, calibration) -> None:
    with torch.no_grad():
        if callable(calibration) and not isinstance(calibration, torch.Tensor):
            calibration(model)
        elif isinstance(calibration, (list, tuple)):
            for batch in calibration:
                model(batch)
        elif isinstance(calibration, dict):
            model(**calibration)
        else:
            model(calibration)


def collect_hessians(model: nn.Module, names: list[str], calibration) -> dict[str, torch.Tensor]:
    """Runs ``calibration`` through the float model and returns H = 2 X^T X / n per named nn.Linear."""
    sums: dict[str, list] = {n: [None, 0] for n in names}
    hooks = []
    for n in names:
        def hook(mod, args, _out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            h = x.t() @ x
            sums[n][0] = h if sums[n][0] is None else sums[n][0] + h
            sums[n][1] += x.shape[0]
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        _run_calibration(model, calibration)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, (s, cnt) in sums.items():
        if s is None:
            raise ValueError(f"quantize_model: calibration never reached layer {n!r}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"quantize_model: the calibration inputs of layer {n!r} hold inf or nan (GPTQ needs "
                             "finite activations)")
        out[n] = 2 * s / cnt
    return out


def quantize_model(model: nn.Module, config=None, calibration=None) -> nn.Module:
    """Replaces every nn.Linear of ``model`` (except those named in config.skip, the LM head by default)
    by a QuantLinear, in place, and returns the model.

    NonDynamicallyQuantizableLinear layers (nn.MultiheadAttention's out_proj, whose weight the attention
    code reads directly) are always kept in floating point, as torch.ao's quantizers keep them.

    config: QuantConfig or dict (bits, group_size, method, act_bits, skip, damp, act_order).
    calibration: needed by method="gptq": a batch the model takes (tensor, list of tensors, dict of
    keyword arguments) or a callable(model) that runs it. Hessians come from the float model's inputs
    to each layer. Save with save_quantized(model, path), load with load_quantized(model, path).
    """
    from thrifty.nn.quant import QuantLinear
    from thrifty.quant.gptq import gptq_quantize

    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be an nn.Module, got {type(model).__name__}")
    cfg = QuantConfig.make(config if config is not None else {})
    names = quantizable_linears(model, cfg.skip)
    if not names:  # e.g. a second call on a quantized model: nothing would change, but the recorded config would
        held = sum(isinstance(m, QuantLinear) for m in model.modules())
        raise ValueError("quantize_model: the model has no nn.Linear layer to quantize"
                         + (f" (it holds {held} QuantLinear layers: quantized already; quantize the float model)"
                            if held else f" outside config 'skip' = {list(cfg.skip)}"))
    if cfg.bits == 4:
        bad = [(n, model.get_submodule(n).in_features) for n in names
               if model.get_submodule(n).in_features % cfg.group_size]
        if bad:
            raise ValueError(f"quantize_model: layer {bad[0][0]!r} has in_features={bad[0][1]}, not a multiple of "
                             f"group_size={cfg.group_size} (list it in config 'skip' or pick another group_size)")
    hessians = {}
    if cfg.method == "gptq":
        if calibration is None:
            raise ValueError("quantize_model: method='gptq' needs calibration data")
        hessians = collect_hessians(model, names, calibration)
    elif cfg.method != "rtn":
        raise ValueError(f"quantize_model: method must be 'rtn' or 'gptq', got {cfg.method!r}")
    aliases = _aliases(model)
    for n in names:
        lin = model.get_submodule(n)
        if cfg.method == "gptq":
            q, s, z, perm = gptq_quantize(lin.weight.detach().float(), hessians.pop(n), bits=cfg.bits,
                                          group_size=cfg.group_size, damp=cfg.damp, act_order=cfg.act_order)
            qm = _from_codes(lin, q, s, z, perm, cfg)
        else:
            qm = QuantLinear.from_float(lin, bits=cfg.bits, group_size=cfg.group_size, method="rtn",
                                        act_bits=cfg.act_bits)
        # one nn.Linear reachable under several names (a module shared by two parents): every name gets
        # the same QuantLinear, as a shared float layer would be (named_modules lists it under one name only)
        for alias in aliases.get(id(lin), [n]):
            _set_module(model, alias, qm)
    # what the layers hold: W8 is per output channel (group_size -1) and act-order is GPTQ's alone
    model._thrifty_quant_config = {**asdict(cfg), "group_size": cfg.group_size if cfg.bits == 4 else -1,
                                   "act_order": cfg.act_order and cfg.method == "gptq"}
    return model


def _from_codes(lin: nn.Linear, q, s, z, perm, cfg: QuantConfig):
    from thrifty.nn.quant import QuantLinear
    from thrifty.quant.formats import pack_int4

    dev = lin.weight.device
    m = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, bits=cfg.bits,
                    group_size=cfg.group_size, act_bits=cfg.act_bits, device=dev,
                    dtype=lin.bias.dtype if lin.bias is not None else None, act_order=perm is not None)
    m.qweight.copy_(q if cfg.bits == 8 else pack_int4(q))
    m.scales.copy_(s)
    if cfg.bits == 4:
        m.zeros.copy_(z)
    if perm is not None:
        m.perm.copy_(perm)
    if lin.bias is not None:
        m.bias.copy_(lin.bias.detach())
    m.weight_dtype = lin.weight.dtype
    return m


def quant_metadata(model: nn.Module) -> dict[str, str]:
    """safetensors metadata: format name and version, and each QuantLinear's config (JSON)."""
    from thrifty.nn.quant import QuantLinear

    layers = {n: m.quant_config() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "layers": json.dumps(layers),
            "config": json.dumps(getattr(model, "_thrifty_quant_config", {}))}


def save_quantized(model: nn.Module, path: str) -> None:
    """Writes model.state_dict() to one .safetensors file with the quantization metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # tied weights share storage; safetensors refuses shared tensors, so store copies
    seen = {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.numel(), v.dtype)
        if v.numel() and key in seen:
            sd[k] = v.clone()
        seen[key] = k
    save_file(sd, path, metadata=quant_metadata(model))


def read_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a thrifty quantized checkpoint (metadata format={meta.get('format')!r})")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: quantization format version {version} is newer than this thrifty "
                         f"supports ({FORMAT_VERSION}); upgrade thrifty")
    return meta


def load_quantized(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Replaces the layers named in the checkpoint's metadata by empty QuantLinears and loads the tensors.
    ``model`` is the float model architecture (its weights are overwritten); it may be built on the meta
    device (``with torch.device("meta"): model = ...``), so that its float weights are never allocated: the
    checkpoint's tensors are then assigned (on the CPU; move the model afterwards). Buffers not saved
    (non-persistent ones) stay on meta, but for thrifty's Llama, whose rotary cache is rebuilt."""
    from safetensors.torch import load_file

    from thrifty.nn.quant import QuantLinear

    meta = read_metadata(path)
    layers = json.loads(meta["layers"])
    aliases = _aliases(model)
    for name, c in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{path}: quantized layer {name!r} does not exist in the model") from err
        dev = next(iter(old.parameters()), torch.empty(0)).device
        bias_dtype = old.bias.dtype if getattr(old, "bias", None) is not None else None
        new = QuantLinear(c["in_features"], c["out_features"], c["bias"], bits=c["bits"],
                          group_size=c["group_size"] if c["bits"] == 4 else 128, act_bits=c["act_bits"], device=dev,
                          dtype=bias_dtype, act_order=c["act_order"], smooth=c.get("smooth", False))
        w = getattr(old, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            new.weight_dtype = w.dtype
        for alias in aliases.get(id(old), [name]):  # a layer shared under several names stays shared
            _set_module(model, alias, new)
    sd = load_file(path)
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        # a skeleton built on the meta device (so that the float weights are never allocated): copying into
        # meta tensors is a no-op, so the checkpoint's tensors are assigned instead, ties between parameters
        # (an LM head sharing the embedding) kept
        shared: dict[int, list[str]] = {}
        for n, prm in model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(prm), []).append(n)
        model.load_state_dict(sd, strict=strict, assign=True)
        for names in shared.values():
            first = model.get_parameter(names[0])
            for n in names[1:]:
                mod_name, _, attr = n.rpartition(".")
                setattr(model.get_submodule(mod_name) if mod_name else model, attr, first)
        if callable(getattr(model, "reset_rope", None)):  # thrifty's Llama: its rotary cache is not in the file
            model.reset_rope()
    else:
        model.load_state_dict(sd, strict=strict)
    model._thrifty_quant_config = json.loads(meta.get("config", "{}"))
    return model


def smooth_fold(prev: nn.Module, linears: list[nn.Linear], act_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant: moves activation outliers into the weights, folded into the previous layer.

    s_k = max|x_k|^alpha / max_n |W[n, k]|^(1 - alpha) (over all ``linears`` sharing the input x);
    prev's output is divided by s (a norm's weight, or the rows of a Linear's weight and bias) and
    every following linear's columns are multiplied by s, so the float model is unchanged while x / s
    has smaller outliers for per-token int8. Returns s.
    """
    # everything checked before the first in-place change: a failure half way would leave the float model altered
    if isinstance(linears, nn.Linear):
        linears = [linears]
    linears = list(linears)
    if not linears or not all(isinstance(l, nn.Linear) for l in linears):
        raise TypeError("smooth_fold: 'linears' must be a non-empty list of nn.Linear layers sharing one input")
    k = linears[0].in_features
    if any(l.in_features != k for l in linears):
        raise ValueError(f"smooth_fold: the linears must share one input, got in_features "
                         f"{[l.in_features for l in linears]}")
    if not isinstance(act_absmax, torch.Tensor) or tuple(act_absmax.shape) != (k,):
        got = tuple(act_absmax.shape) if isinstance(act_absmax, torch.Tensor) else type(act_absmax).__name__
        raise ValueError(f"smooth_fold: 'act_absmax' must be a tensor of shape (in_features,) = ({k},), got {got}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"smooth_fold: 'alpha' must be a number in [0, 1], got {alpha!r}")
    if not bool(torch.isfinite(act_absmax).all()):
        raise ValueError("smooth_fold: 'act_absmax' holds inf or nan")
    if isinstance(prev, nn.Linear):
        if prev.out_features != k:
            raise ValueError(f"smooth_fold: previous layer has {prev.out_features} outputs, expected {k}")
    elif isinstance(getattr(prev, "weight", None), torch.Tensor) and prev.weight.dim() == 1:
        if prev.weight.numel() != k:
            raise ValueError(f"smooth_fold: previous layer's weight has {prev.weight.numel()} elements, expected {k}")
    with torch.no_grad():
        wmax = torch.stack([l.weight.detach().abs().amax(0).float() for l in linears]).amax(0)
        s = (act_absmax.float().clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        if isinstance(prev, nn.Linear):
            if prev.out_features != s.numel():
                raise ValueError(f"smooth_fold: previous layer has {prev.out_features} outputs, expected {s.numel()}")
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        elif hasattr(prev, "weight") and prev.weight is not None and prev.weight.dim() == 1:
            prev.weight.div_(s.to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:
            raise TypeError(f"smooth_fold: cannot fold into {type(prev).__name__} (need a norm with a weight or a Linear)")
        for l in linears:
            l.weight.mul_(s.to(l.weight.dtype)[None, :])
    return s
