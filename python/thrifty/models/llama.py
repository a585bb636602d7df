"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2) on thrifty ops.

Parameter names are Hugging Face's (model.layers.N.self_attn.q_proj.weight, ...), so
checkpoints load and save unchanged (see thrifty.models.hf).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.models.attention import AttnMeta, KVCache, attend
from thrifty.models.config import LlamaConfig, build_cos_sin
from thrifty.nn import RMSNorm
from thrifty.ops import linear_cross_entropy
from thrifty.models import _kernels as K


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=cfg.o_bias)

    def forward(self, x, positions, cos_sin, meta: AttnMeta, cache=None):
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(*lead, self.n_kv, self.head_dim)
        q, k = K.rotary(q, k, positions, cos_sin)
        out = attend(q, k, v, meta, cache, self.layer)
        return self.o_proj(out.reshape(*lead, -1))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = K.MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, delta, positions, cos_sin, meta, cache=None):
        """The residual stream is h + delta (delta None: just h); returns the next (h, delta).
        The adds are fused into the norms."""
        if delta is None:
            x = self.input_layernorm(h)
        else:
            x, h = self.input_layernorm(delta, h)
        x, h = self.post_attention_layernorm(self.self_attn(x, positions, cos_sin, meta, cache), h)
        return h, self.mlp(x)


class Backbone(nn.Module):  # "model." in Hugging Face names
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """Decoder-only transformer of the Llama family.

    forward(input_ids, positions=None, labels=None, cu_seqlens=None) returns logits
    (input_ids' shape + (vocab,)), or with ``labels`` the mean cross-entropy of predicting
    labels[t + 1] from position t (labels shifted inside, -100 ignored, as transformers does),
    computed by the fused thrifty.ops.linear_cross_entropy without the logits.
    ``cu_seqlens`` (docs + 1,) int32 marks packed documents in a flat (tokens,) or (1, tokens)
    input: attention and the shifted labels stay inside each document.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("cos_sin", build_cos_sin(config, config.max_position_embeddings), persistent=False)
        self.meta = AttnMeta(scale=config.head_dim ** -0.5, window=config.sliding_window)
        K.use_fast_linear(self)

    def reset_rope(self) -> None:
        """Recomputes the rotary cache (after building on the meta device, say)."""
        self.cos_sin = build_cos_sin(self.config, self.config.max_position_embeddings, self.lm_head.weight.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cos_sin.dtype != torch.float32:  # model.to(bfloat16) must not round the rotary cache
            self.cos_sin = build_cos_sin(self.config, self.config.max_position_embeddings, self.cos_sin.device)
        return self

    def init_weights(self, std: float = 0.02) -> "Llama":
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        return self

    def hidden_states(self, input_ids, positions=None, cu_seqlens=None, cache=None):
        """Final-norm hidden states (input_ids' shape + (hidden,))."""
        meta = self.meta
        if cu_seqlens is not None:
            input_ids = input_ids.reshape(-1)
            if positions is None:
                starts = cu_seqlens[:-1].long()
                lens = cu_seqlens[1:].long() - starts
                positions = torch.arange(input_ids.shape[0], device=input_ids.device) - torch.repeat_interleave(starts, lens)
            meta = AttnMeta(meta.scale, meta.window, cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        elif positions is None:
            start = cache.pos if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[-1], device=input_ids.device).expand(input_ids.shape)
        h, delta = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            h, delta = layer(h, delta, positions, self.cos_sin, meta, cache)
        if cache is not None:
            cache.advance(input_ids.shape[-1])
        return self.model.norm(delta, h)[0]

    def forward(self, input_ids, positions=None, labels=None, cu_seqlens=None, cache=None):
        h = self.hidden_states(input_ids, positions, cu_seqlens, cache)
        if labels is None:
            return self.lm_head(h)
        labels = labels.reshape(h.shape[:-1])
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        if cu_seqlens is not None:  # the last token of a document predicts nothing
            shifted = shifted.clone()
            shifted[cu_seqlens[1:].long() - 1] = -100
        return linear_cross_entropy(h, self.lm_head.weight, shifted)

    # ---- generation ----
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt (batch, seq) + up to max_new_tokens sampled tokens, with a contiguous KV cache.

        temperature 0 is greedy; top_k / top_p filter the distribution first. Generation stops
        when every row has produced an eos (the config's when eos_token_id is None); finished
        rows are padded with their eos.
        """
        squeeze = input_ids.dim() == 1
        ids = input_ids[None] if squeeze else input_ids
        b, s = ids.shape
        if s + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"generate: prompt ({s}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        eos = self.config.eos_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        eos_t = torch.tensor(eos, device=ids.device, dtype=ids.dtype)
        w = self.lm_head.weight
        cache = KVCache(self.config.num_hidden_layers, b, s + max_new_tokens, self.config.num_key_value_heads,
                        self.config.head_dim, w.dtype, w.device)
        out = [ids]
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        x = ids
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden_states(x, cache=cache)[:, -1]).float()
            nxt = sample(logits, temperature, top_k, top_p, generator)
            if len(eos):
                nxt = torch.where(done, eos_t[0], nxt)
                done |= torch.isin(nxt, eos_t)
            out.append(nxt[:, None])
            x = nxt[:, None]
            if len(eos) and bool(done.all()):
                break
        res = torch.cat(out, dim=1)
        return res[0] if squeeze else res

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "Llama":
        from thrifty.models.hf import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size: int | None = None) -> None:
        from thrifty.models.hf import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of (batch, vocab) logits: argmax at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
