"""Hugging Face checkpoints in and out: config.json + *.safetensors (single file or sharded with
model.safetensors.index.json), read and written directly, with no transformers import."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from thrifty.models.config import LlamaConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {path} (pytorch_model.bin is not read: convert it)")
    return found


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device=None):
    """Builds ``cls(config)`` from a checkpoint folder. dtype None keeps the stored dtype."""
    path = Path(path)
    cfg = LlamaConfig.from_json(path)
    tensors = {}
    for f in _files(path):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name)
    if dtype is None:
        dtype = next((t.dtype for n, t in tensors.items() if n.endswith("proj.weight")), torch.float32)
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors:
        raise ValueError(f"{path}: checkpoint has no lm_head.weight and config field 'tie_word_embeddings' is false")
    missing = sorted(set(expected) - set(tensors) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    unexpected = sorted(n for n in set(tensors) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for n, t in tensors.items():
        if n in expected and tuple(t.shape) != tuple(expected[n].shape):
            raise ValueError(f"{path}: tensor {n} has shape {tuple(t.shape)}, the config implies "
                             f"{tuple(expected[n].shape)}")
    state = {n: t.to(device=device, dtype=dtype) for n, t in tensors.items() if n in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    return model.eval()


def save_pretrained(model, path, max_shard_size: int | None = None) -> None:
    """Writes config.json and model.safetensors (sharded with an index past max_shard_size bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = model.lm_head.weight.dtype
    cfg.save(path, dtype)
    meta = {"format": "pt"}
    if max_shard_size is None or sum(t.numel() * t.element_size() for t in state.values()) <= max_shard_size:
        save_file(state, str(path / "model.safetensors"), metadata=meta)
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
