"""Plain-PyTorch Llama used by the trainer ONLY when thrifty.models is not present in this build.

Same interface as thrifty.models (LlamaConfig with Hugging Face config.json names, Llama with
forward(input_ids, positions=None, labels=None, cu_seqlens=None), from_pretrained /
save_pretrained in the Hugging Face layout, generate). No thrifty kernels: attention is SDPA with
a block-diagonal causal mask built from cu_seqlens.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu")
        return d


PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=True),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True),
}


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos[..., None].float() * inv  # (B, S, d/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        H, K, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, H * D, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, K * D, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, K * D, bias=c.attention_bias)
        self.o_proj = nn.Linear(H * D, c.hidden_size, bias=False)

    def forward(self, x, pos, mask, cache=None):
        B, S, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(B, S, -1, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, c.head_dim).transpose(1, 2)
        q, k = _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta)
        if cache is not None:
            if cache.get("k") is not None:
                k = torch.cat([cache["k"], k], 2)
                v = torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1,
                                           enable_gqa=c.num_key_value_heads != c.num_attention_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, pos, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), pos, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = _Inner(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, positions=None, labels=None, cu_seqlens=None, _cache=None):
        B, S = input_ids.shape
        if positions is None:
            off = 0 if not _cache else _cache[0].get("len", 0)
            positions = torch.arange(off, off + S, device=input_ids.device).expand(B, S)
        mask = None
        if cu_seqlens is not None:
            flat = torch.arange(B * S, device=input_ids.device)
            seg = torch.searchsorted(cu_seqlens[1:].long(), flat, right=True).view(B, S)
            causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
            mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        elif _cache and _cache[0].get("len", 0) and S > 1:
            raise NotImplementedError("stand-in: multi-token step with a filled cache")
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, mask, _cache[i] if _cache else None)
        if _cache:
            for c in _cache:
                c["len"] = c.get("len", 0) + S
        x = self.model.norm(x)
        if labels is None:
            return self.lm_head(x)
        logits = self.lm_head(x[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=32, temperature=1.0, top_k=None, top_p=None, eos_token_id=None):
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        cache = [dict() for _ in self.model.layers]
        out = input_ids
        logits = self(input_ids, _cache=cache)[:, -1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = logits.float()
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)
                if top_p is not None and top_p < 1:
                    sp, si = probs.sort(-1, descending=True)
                    drop = sp.cumsum(-1) - sp > top_p
                    sp = sp.masked_fill(drop, 0)
                    probs = torch.zeros_like(probs).scatter(-1, si, sp)
                nxt = torch.multinomial(probs, 1)[:, 0]
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            out = torch.cat([out, nxt[:, None]], 1)
            if eos is not None and bool(done.all()):
                break
            logits = self(nxt[:, None], _cache=cache)[:, -1]
        return out

    def save_pretrained(self, path):
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        d = self.config.to_dict()
        d["torch_dtype"] = str(next(self.parameters()).dtype).replace("torch.", "")
        (p / "config.json").write_text(json.dumps(d, indent=1))
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        from safetensors.torch import load_file

        p = Path(path)
        cfg = LlamaConfig.from_dict(json.loads((p / "config.json").read_text()))
        m = cls(cfg)
        sd = {}
        if (p / "model.safetensors").is_file():
            sd = load_file(str(p / "model.safetensors"))
        else:
            idx = json.loads((p / "model.safetensors.index.json").read_text())
            for f in sorted(set(idx["weight_map"].values())):
                sd.update(load_file(str(p / f)))
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"from_pretrained({path}): missing {missing[:5]}, unexpected {unexpected[:5]}")
        if dtype is not None:
            m.to(dtype)
        return m
