"""Hugging Face checkpoints in and out: config.json + *.safetensors (single file or sharded with
model.safetensors.index.json), read and written directly, with no transformers import."""
from __future__ import annotations

import json
import numbers
import operator
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thrifty.models.config import LlamaConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's *.safetensors files, in transformers' order: model.safetensors first, then the index
    (a folder saved unsharded over a sharded save by transformers keeps a stale index.json whose shards are
    gone), then any *.safetensors. The one rule for every reader (from_pretrained, `thrifty quantize`)."""
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (a JSON object with a \"weight_map\" of "
                             f"tensor name -> file): {type(e).__name__}: {e}") from None
        return [path / s for s in shards]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path} (pytorch_model.bin is not read: convert it)")
    return found


def resolve_dtype(dtype) -> torch.dtype | None:
    """A torch dtype, its name ("bfloat16", "torch.float16", "bf16") or None / "auto" (keep the stored dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return None
        alias = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
        name = alias.get(name, name)
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"from_pretrained: argument 'dtype' must be torch.float32, torch.bfloat16, torch.float16, "
                     f"their names or 'auto', got {dtype!r}")


def _check_quant_format_version(qc: dict, config_file: Path) -> None:
    """A thrifty quantization_config names the packed-weight format version it was written in
    (thrifty.quant.formats.FORMAT_VERSION); one this thrifty does not know is refused rather than misread.
    Absent (files from before the field): the safetensors metadata's version is checked when it is read."""
    from thrifty.quant.formats import FORMAT_VERSION

    if "format_version" not in qc:
        return
    version = qc["format_version"]
    supported = list(range(1, FORMAT_VERSION + 1))
    if isinstance(version, bool) or not isinstance(version, int) or version not in supported:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise ValueError(f"from_pretrained: {config_file}: quantization_config.format_version = {version!r} is not "
                         f"supported (this thrifty reads format versions {', '.join(map(str, supported))})"
                         + ("; it was written by a newer thrifty: upgrade thrifty" if newer else ""))


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device=None):
    """Builds ``cls(config)`` from a checkpoint folder. dtype None (or "auto") keeps the stored dtype."""
    dtype = resolve_dtype(dtype)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"from_pretrained: {str(path)!r} does not exist (expected a directory with "
                                "config.json and *.safetensors)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"from_pretrained: {str(path)!r} has no config.json (expected a Hugging Face model "
                                "directory: config.json and *.safetensors)")
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    thrifty_quant = isinstance(qc, dict) and qc.get("quant_method") == "thrifty"
    if thrifty_quant:  # written by `thrifty quantize` / save_pretrained of a quantized model
        _check_quant_format_version(qc, path / "config.json")
        raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    cfg = LlamaConfig.from_dict(raw)
    tensors, layers, quant_config = {}, {}, {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            if thrifty_quant:
                from thrifty.quant.model import read_metadata
                meta = read_metadata(str(f))
                layers.update(json.loads(meta.get("layers", "{}")))
                quant_config = json.loads(meta.get("config", "{}")) or quant_config
            for name in st.keys():
                tensors[name] = st.get_tensor(name)
    if dtype is None:
        dtype = next((t.dtype for n, t in tensors.items() if n.endswith("proj.weight") or n.endswith("embed_tokens.weight")),
                     torch.float32)
    with torch.device("meta"):
        model = cls(cfg)
        if layers:
            _quant_layers(model, layers, path, dtype)
    expected = model.state_dict()
    keep_dtype = {f"{n}.{b}" for n in layers for b in ("qweight", "scales", "zeros", "perm", "smooth")}
    if cfg.tie_word_embeddings and "lm_head" not in layers:
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors and "lm_head" not in layers:
        raise ValueError(f"{path}: checkpoint has no lm_head.weight and config field 'tie_word_embeddings' is false")
    tied = cfg.tie_word_embeddings and "lm_head" not in layers
    missing = sorted(set(expected) - set(tensors) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(n for n in set(tensors) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for n, t in tensors.items():
        if n in expected and tuple(t.shape) != tuple(expected[n].shape):
            raise ValueError(f"{path}: tensor {n} has shape {tuple(t.shape)}, the config implies "
                             f"{tuple(expected[n].shape)}")
    state = {n: t.to(device=device) if n in keep_dtype else t.to(device=device, dtype=dtype)
             for n, t in tensors.items() if n in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if layers:  # what save_pretrained writes back as quantization_config (config.json's block if the files hold none)
        model._thrifty_quant_config = quant_config or {k: qc[k] for k in ("bits", "group_size", "method", "act_bits")
                                                       if k in qc}
    model.reset_rope()
    return model.eval()


def _quant_layers(model, layers: dict, path, dtype: torch.dtype) -> None:
    """Replaces the layers a thrifty-quantized checkpoint names by empty QuantLinears (meta device) whose
    bias and dequantized ``weight`` take the model's dtype, as the float layers they replace."""
    from thrifty.nn.quant import QuantLinear

    for name, c in layers.items():
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{path}: quantized layer {name!r} does not exist in the model") from err
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(
            c["in_features"], c["out_features"], c["bias"], bits=c["bits"],
            group_size=c["group_size"] if c["bits"] == 4 else 128, act_bits=c.get("act_bits", 16),
            dtype=dtype, act_order=c.get("act_order", False), smooth=c.get("smooth", False)))


# max_shard_size units as transformers' save_pretrained reads them: KB/MB/GB/TB powers of 1000
# (huggingface_hub.serialization.parse_size_to_int), KiB/MiB/GiB powers of 1024 (transformers.utils.hub.
# convert_file_size_to_int, which transformers 4 used); case-insensitive, a decimal number before the unit.
_SIZE_UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]I?B)\s*", re.IGNORECASE)


def parse_shard_size(max_shard_size) -> int | None:
    """max_shard_size in bytes: None (no sharding), a positive int, or a string such as "5GB", "500MB", "20KB"
    (powers of 1000) or "2GiB", "512MiB", "20KiB" (powers of 1024), as transformers' save_pretrained takes it.
    Anything else (0, negative, bool, float, "lots") raises ValueError naming 'max_shard_size'."""
    if max_shard_size is None:
        return None
    err = (f"save_pretrained: argument 'max_shard_size' must be a positive number of bytes (an int) or a size "
           f"string such as '5GB', '500MB', '20KB' or '2GiB', got {max_shard_size!r}")
    if isinstance(max_shard_size, str):
        m = _SIZE_RE.fullmatch(max_shard_size)
        if m is None:
            raise ValueError(err)
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    elif isinstance(max_shard_size, numbers.Integral) or (isinstance(max_shard_size, torch.Tensor)
                                                           and max_shard_size.dim() == 0):
        if isinstance(max_shard_size, bool) or getattr(max_shard_size, "dtype", None) in (torch.bool,):
            raise ValueError(err)
        try:
            size = operator.index(max_shard_size)
        except TypeError:
            raise ValueError(err) from None
    else:
        raise ValueError(err)
    if size <= 0:
        raise ValueError(err)
    return size


def save_pretrained(model, path, max_shard_size: int | str | None = None) -> None:
    """Writes config.json and model.safetensors (sharded with an index past max_shard_size: bytes as an int, or
    a string such as "5GB", "500MB" (powers of 1000) or "2GiB" (powers of 1024), as transformers takes it).
    A model with thrifty.nn.QuantLinear layers (thrifty.quant.quantize_model) is written in the format of
    `thrifty quantize` (quantization_config in config.json, the layers in the safetensors metadata)."""
    from thrifty.nn.quant import QuantLinear

    max_shard_size = parse_shard_size(max_shard_size)  # before anything is written
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = model.model.embed_tokens.weight.dtype
    meta = {"format": "pt"}
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        from thrifty.quant.formats import FORMAT_VERSION
        from thrifty.quant.model import quant_metadata

        meta.update(quant_metadata(model))
        qcfg = json.loads(meta["config"]) or {}
        d = cfg.to_dict(dtype)
        d["quantization_config"] = {"quant_method": "thrifty", "format_version": FORMAT_VERSION,
                                    **{k: qcfg[k] for k in ("bits", "group_size", "method", "act_bits") if k in qcfg}}
        (path / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    else:
        cfg.save(path, dtype)
    if max_shard_size is None or sum(t.numel() * t.element_size() for t in state.values()) <= max_shard_size:
        save_file(state, str(path / "model.safetensors"), metadata=meta)
        remove_stale_weights(path, {"model.safetensors"})
        return
    shards, cur, size = [], {}, 0
    for n, t in state.items():
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[n] = t
        size += nb
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        weight_map.update({n: name for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    remove_stale_weights(path, {"model.safetensors.index.json", *weight_map.values()})


_WEIGHT_FILE = re.compile(r"model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")


def remove_stale_weights(path: Path, written: set[str]) -> None:
    """Removes the weight files of an earlier save into ``path`` (model.safetensors, its index, model-*-of-*
    shards) that this save did not write, as transformers' save_pretrained does: left there, a loader could
    read the old weights (an index next to a new model.safetensors, shards next to a new index)."""
    for f in path.iterdir():
        if f.name not in written and _WEIGHT_FILE.fullmatch(f.name) and f.is_file():
            f.unlink()
