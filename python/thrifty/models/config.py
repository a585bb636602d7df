"""LlamaConfig: the Hugging Face config.json fields of the Llama family (Llama 2/3, Mistral,
Qwen2), the presets, and the rotary frequencies (default, linear and Llama-3 scaling)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
# config.json keys that only describe training or tooling: read and dropped.
_IGNORED = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
            "use_cache", "attention_dropout", "pretraining_tp", "max_window_layers", "_name_or_path",
            "output_attentions", "output_hidden_states", "return_dict", "is_decoder", "tokenizer_class",
            "_attn_implementation_autoset", "layer_types", "use_sliding_window", "rope_parameters", "rope_scaling",
            "rope_theta", "id2label", "label2id", "problem_type", "chunk_size_feed_forward"}


class ConfigError(ValueError):
    """A config.json field (or architecture) thrifty's Llama does not support; the message names it."""


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # None: = num_attention_heads (no GQA)
    head_dim: int | None = None              # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    attention_bias: bool = False             # Llama: bias on q, k, v and o
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None        # Mistral: a token sees itself and the sliding_window - 1 before it
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"                # "llama", "mistral" or "qwen2" (Qwen2: bias on q, k, v only)
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, written back on save

    def __post_init__(self):
        self._check_sizes()  # before head_dim = hidden_size // num_attention_heads divides by it
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size < self.num_attention_heads:
                raise ConfigError(f"config field 'hidden_size' = {self.hidden_size} is smaller than "
                                  f"num_attention_heads = {self.num_attention_heads} (head_dim would be 0)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ---- derived ----
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def rope_parameters(self) -> dict:
        """The rope block as transformers 5 names it: {"rope_type", "rope_theta", scaling fields...}."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        return rope

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    _SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")

    def _check_sizes(self) -> None:
        for name in self._SIZES:
            v = getattr(self, name)
            if v is None and name in ("num_key_value_heads", "head_dim"):  # None: derived
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ConfigError(f"config field {name!r} = {v!r} must be a positive integer")

    def validate(self) -> None:
        self._check_sizes()
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(f"config field 'model_type' = {self.model_type!r} is not supported "
                              f"(thrifty.models.Llama supports {sorted(ARCHITECTURES)})")
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' = {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config field 'num_key_value_heads' = {self.num_key_value_heads} must divide "
                              f"num_attention_heads = {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' = {self.head_dim} must be even (rotary embedding)")
        # numbers a wrong config.json would otherwise carry into the model unnoticed (a string eps, a negative theta)
        for name, v in (("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf:
                raise ConfigError(f"config field {name!r} = {v!r} must be a finite number > 0")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name!r} = {getattr(self, name)!r} must be true or false")
        sw = self.sliding_window
        if sw is not None and (isinstance(sw, bool) or not isinstance(sw, numbers.Integral) or sw <= 0):
            raise ConfigError(f"config field 'sliding_window' = {sw!r} must be a positive integer or null")
        # what each architecture's config.json can say (transformers' Mistral has no biases, Qwen2 none in its
        # MLP and no windows here, Llama no window): anything else would be lost on save, or ignored on load
        if self.sliding_window is not None and self.model_type != "mistral":
            raise ConfigError(f"config field 'sliding_window' = {self.sliding_window} is not supported for "
                              f"{self.model_type} (only mistral)")
        if self.model_type == "mistral" and (self.attention_bias or self.mlp_bias):
            name = "attention_bias" if self.attention_bias else "mlp_bias"
            raise ConfigError(f"config field {name!r} = True is not supported for mistral (its layers have no bias)")
        if self.model_type == "qwen2" and self.mlp_bias:
            raise ConfigError("config field 'mlp_bias' = True is not supported for qwen2 (its MLP has no bias)")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ConfigError(f"config field 'rope_scaling' (rope_parameters) has rope_type {kind!r}, "
                                  f"not supported (supported: {', '.join(ROPE_TYPES)})")
            if kind == "llama3":
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if k not in rs:
                        raise ConfigError(f"config field 'rope_scaling' (llama3) lacks {k!r}")
            if kind == "linear" and "factor" not in rs:
                raise ConfigError("config field 'rope_scaling' (linear) lacks 'factor'")
            f = rs.get("factor")
            if kind in ("linear", "llama3") and (isinstance(f, bool) or not isinstance(f, numbers.Real)
                                                 or not 0 < f < math.inf):
                raise ConfigError(f"config field 'rope_scaling' ({kind}) has factor {f!r}: it must be a finite "
                                  "number > 0")

    # ---- config.json ----
    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        arch = d.get("architectures") or []
        mt = d.get("model_type", "llama")
        if mt not in ARCHITECTURES:
            raise ConfigError(f"config field 'model_type' = {mt!r} is not supported "
                              f"(thrifty.models.Llama supports {sorted(ARCHITECTURES)})")
        for a in arch:
            if a not in ARCHITECTURES.values():
                raise ConfigError(f"config field 'architectures' = {arch!r}: {a!r} is not supported "
                                  f"(supported: {', '.join(ARCHITECTURES.values())})")
        for key, ok in (("quantization_config", None), ("attn_logit_softcapping", None),
                        ("final_logit_softcapping", None), ("num_local_experts", None), ("num_experts", None),
                        ("partial_rotary_factor", 1.0), ("attention_dropout", 0.0)):
            if d.get(key, ok) not in (ok,):
                raise ConfigError(f"config field {key!r} = {d[key]!r} is not supported by thrifty.models.Llama")
        if d.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"config field 'pretraining_tp' = {d['pretraining_tp']} is not supported (only 1)")
        # rope: transformers 5 writes rope_parameters {"rope_type", "rope_theta", ...}; older files rope_theta + rope_scaling
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = rope or d.get("rope_scaling")
        if scaling:
            scaling = dict(scaling)
            kind = scaling.pop("type", None)
            scaling.setdefault("rope_type", kind or "default")
            if scaling["rope_type"] == "default":
                scaling = None
        sliding = d.get("sliding_window")
        if mt == "qwen2":
            if d.get("use_sliding_window"):
                raise ConfigError("config field 'use_sliding_window' = true is not supported for qwen2")
            sliding = None
        elif mt == "llama" and sliding is not None:
            raise ConfigError(f"config field 'sliding_window' = {sliding} is not supported for llama")
        lt = d.get("layer_types")
        if lt and any(t != "full_attention" for t in lt) and mt != "mistral":
            raise ConfigError(f"config field 'layer_types' = {lt!r}: only full_attention layers are supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling", "sliding_window",
                                                               "model_type"}
        kw = {k: d[k] for k in names if k in d}
        extra = {k: v for k, v in d.items() if k not in names and k not in _IGNORED and k != "sliding_window"}
        return cls(**kw, rope_theta=float(theta), rope_scaling=scaling, sliding_window=sliding, model_type=mt,
                   extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return cls.from_dict(json.loads(p.read_text()))

    def to_dict(self, dtype: torch.dtype | None = None) -> dict:
        """config.json as transformers writes it (both rope_parameters and the older rope_theta/rope_scaling)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["rope_parameters"] = self.rope_parameters
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d["use_sliding_window"] = False
            d["sliding_window"] = None
        elif self.model_type == "llama":
            d.pop("sliding_window")
        if dtype is not None:
            d["dtype"] = str(dtype).removeprefix("torch.")
        return d

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        Path(path, "config.json").write_text(json.dumps(self.to_dict(dtype), indent=2, sort_keys=True) + "\n")

    # Hugging Face names for the same things
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlamaConfig":
        """config.json of a model directory (or the file itself), as transformers' PretrainedConfig reads it."""
        p = Path(path)
        if not (p / "config.json" if p.is_dir() else p).is_file():
            raise FileNotFoundError(f"LlamaConfig.from_pretrained: no config.json at {str(p)!r}")
        return cls.from_json(p)

    def save_pretrained(self, path: str | Path) -> None:
        """Writes ``path``/config.json (created if needed)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.save(path)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    # ---- presets ----
    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    from_preset = preset  # alias

    def num_params(self) -> int:
        h, d, kv = self.hidden_size, self.head_dim, self.num_key_value_heads
        attn = h * d * (2 * self.num_attention_heads + 2 * kv)
        attn += (self.num_attention_heads + 2 * kv) * d * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + 2 * h) + emb + h


def _accept_hf_kwargs(cls):
    """LlamaConfig(**kwargs) also takes the other config.json names transformers' configs take
    (rope_parameters, initializer_range, use_cache, ...): read like config.json (from_dict)."""
    import functools

    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"LlamaConfig takes at most {len(names)} positional arguments, got {len(args)}")
        for name, v in zip(names, args):
            if name in kwargs:
                raise TypeError(f"LlamaConfig got multiple values for argument {name!r}")
            kwargs[name] = v
        if all(k in names for k in kwargs):
            init(self, **kwargs)
            return
        extra = kwargs.pop("extra", None) or {}
        built = cls.from_dict({**extra, **kwargs})
        self.__dict__.update(built.__dict__)

    cls.__init__ = __init__
    return cls


_accept_hf_kwargs(LlamaConfig)


# Embedded defaults: `tiny` (~10M parameters, trains visibly in minutes on 2 CPU cores) and `small` (~125M).
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True, rope_theta=10000.0),
    "small": dict(vocab_size=32000, hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                  tie_word_embeddings=True, rope_theta=10000.0),
}


def build_cos_sin(cfg: LlamaConfig, max_position: int, device=None) -> torch.Tensor:
    """(max_position, head_dim) float32 [cos | sin] rotary cache (thrifty.ops.build_rotary_cache, which computes
    the frequencies as transformers does for default, linear and llama3 rope)."""
    from thrifty.ops import build_rotary_cache
    return build_rotary_cache(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling, device=device)
