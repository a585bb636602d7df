"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2) on thrifty ops.

Parameter names are Hugging Face's (model.layers.N.self_attn.q_proj.weight, ...), so
checkpoints load and save unchanged (see thrifty.models.hf).
"""
from __future__ import annotations

import numbers
import operator

import torch
import torch.nn.functional as F
from torch import nn

from thrifty.models.attention import AttnMeta, KVCache, attend
from thrifty.models.config import LlamaConfig, build_cos_sin
from thrifty.nn import RMSNorm
from thrifty.ops.loss import _linear_cross_entropy
from thrifty.models import _kernels as K


class TokenIdError(ValueError, IndexError):
    """An input id outside the vocabulary (a ValueError naming the argument; an IndexError as torch's own)."""


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
    computed by the fused thrifty.ops.linear_cross_entropy without the logits, as a float32 scalar
    whatever the model's dtype (as transformers returns it).
    ``cu_seqlens`` (docs + 1,) int32 marks packed documents in a flat (tokens,) or (1, tokens)
    input: attention and the shifted labels stay inside each document (the logits keep the input's
    shape: (tokens, vocab) or (1, tokens, vocab)).
    With ``labels`` the fused loss reads ``lm_head.weight`` itself (the logits are never formed), so forward
    hooks on lm_head do not run there (parametrizations of its weight do); ``model.model`` holds the layers
    and has no forward of its own (``hidden_states`` gives the final-norm states).
    ``cache``: a KVCache (batched input, one length for every sequence; generate() uses it) or,
    with cu_seqlens, a RaggedKVCache-like cache (thrifty.models.attention): each packed sequence
    continues its own cached tokens, so one forward can mix prefill chunks and decode steps.
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
        self.cos_sin = build_cos_sin(self.config, self.config.max_position_embeddings,
                                     self.model.embed_tokens.weight.device)

    def _apply(self, fn, recurse=True):
        was_meta = self.cos_sin.is_meta
        super()._apply(fn, recurse)
        # model.to(bfloat16) must not round the rotary cache; to_empty() off the meta device leaves it
        # uninitialised (a non-persistent buffer: load_state_dict does not fill it): both are rebuilt
        if self.cos_sin.dtype != torch.float32 or (was_meta and not self.cos_sin.is_meta):
            self.cos_sin = build_cos_sin(self.config, self.config.max_position_embeddings, self.cos_sin.device)
        return self

    def to_empty(self, *, device, recurse: bool = True) -> "Llama":
        """nn.Module.to_empty, then what it cannot do: the rotary cache (a non-persistent buffer, which no
        load_state_dict fills) computed, and a tied LM head tied again (to_empty gives each name its own tensor)."""
        was_meta = self.cos_sin.is_meta
        super().to_empty(device=device, recurse=recurse)
        if not was_meta:  # (off the meta device, _apply has rebuilt it already)
            self.reset_rope()
        self._tie_lm_head()
        return self

    def _tie_lm_head(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear) and \
                self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std: float = 0.02) -> "Llama":
        if not self.cos_sin.is_meta:  # the step after to_empty() in meta-device recipes: the rotary cache too
            self.reset_rope()
        self._tie_lm_head()
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        return self

    def _check_cu_seqlens(self, cu_seqlens, n_tokens: int, max_seqlen):
        """cu_seqlens as varlen attention takes it (int32, 1-D, from 0 to the token count) and the longest
        document; reads the device values only when max_seqlen is not given (one host sync; under torch.compile
        the token count stands for it instead)."""
        if not isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.int32)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"Llama: argument 'cu_seqlens' must be 1-D (documents + 1,) offsets starting at 0, "
                             f"got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.dtype != torch.int32:
            if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
                raise TypeError(f"Llama: argument 'cu_seqlens' must be an integer tensor (int32), got {cu_seqlens.dtype}")
            cu_seqlens = cu_seqlens.to(torch.int32)
        if max_seqlen is None and torch.compiler.is_compiling():
            # the longest document is a device value (a data-dependent guard torch.compile cannot trace): the
            # token count bounds it, which the kernels accept (max_seqlen is an upper bound); they check cu_seqlens
            max_seqlen = n_tokens
        if max_seqlen is None:
            first, last, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1],
                                                (cu_seqlens[1:] - cu_seqlens[:-1]).max()]).tolist()
            if first != 0 or last != n_tokens:
                raise ValueError(f"Llama: argument 'cu_seqlens' must run from 0 to the number of tokens {n_tokens}, "
                                 f"got {first} ... {last}")
            max_seqlen = longest
        # a SymInt stays one (int() would specialize a dynamic-shape graph to this token count)
        return cu_seqlens, max_seqlen if isinstance(max_seqlen, torch.SymInt) else int(max_seqlen)

    def _check_ids(self, input_ids):
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"Llama: argument 'input_ids' must be a tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Llama: argument 'input_ids' must hold integer token ids (int64 or int32), "
                            f"got {input_ids.dtype}")

    def _embed(self, input_ids):
        try:
            return self.model.embed_tokens(input_ids)
        except IndexError as err:
            raise TokenIdError(f"Llama: argument 'input_ids' holds ids outside [0, vocab_size={self.config.vocab_size})"
                                f" ({err})") from err

    def hidden_states(self, input_ids, positions=None, cu_seqlens=None, cache=None, max_seqlen=None):
        """Final-norm hidden states (input_ids' shape + (hidden,))."""
        h = self._hidden(input_ids, positions, cu_seqlens, cache, max_seqlen)
        return h.view(*input_ids.shape, h.shape[-1]) if cu_seqlens is not None else h

    def _hidden(self, input_ids, positions=None, cu_seqlens=None, cache=None, max_seqlen=None):
        """hidden_states, flat (tokens, hidden) with cu_seqlens."""
        self._check_ids(input_ids)
        if input_ids.numel() == 0:
            raise ValueError(f"Llama: argument 'input_ids' must hold at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        meta = self.meta
        if cu_seqlens is not None:
            input_ids = input_ids.reshape(-1)
            cu_seqlens, max_seqlen = self._check_cu_seqlens(cu_seqlens, input_ids.shape[0], max_seqlen)
            if cache is not None and not (hasattr(cache, "update_varlen") and hasattr(cache, "advance_varlen")):
                raise ValueError(f"Llama: packed input (cu_seqlens) with a cache needs a per-sequence cache with "
                                 f"update_varlen() and advance_varlen() (thrifty.models.RaggedKVCache); "
                                 f"{type(cache).__name__} keeps one length for the whole batch")
            if positions is None and cache is not None:
                if not hasattr(cache, "positions"):
                    raise ValueError(f"Llama: packed input with a {type(cache).__name__} needs 'positions' (each "
                                     f"token's position after its sequence's cached ones)")
                positions = cache.positions(cu_seqlens)
            elif positions is None:
                starts = cu_seqlens[:-1].long()
                lens = cu_seqlens[1:].long() - starts
                positions = torch.arange(input_ids.shape[0], device=input_ids.device) - torch.repeat_interleave(
                    starts, lens, output_size=input_ids.shape[0])
            else:
                positions = positions.reshape(-1)
            meta = AttnMeta(meta.scale, meta.window, cu_seqlens, max_seqlen)
        else:
            if input_ids.dim() == 1:  # one unbatched sequence
                return self._hidden(input_ids[None], None if positions is None else positions.reshape(1, -1),
                                    None, cache)[0]
            if input_ids.dim() != 2:
                raise ValueError(f"Llama: argument 'input_ids' must be (batch, seq) (or (tokens,) with cu_seqlens), "
                                 f"got shape {tuple(input_ids.shape)}")
            if positions is None:
                start = cache.pos if cache is not None else 0
                positions = torch.arange(start, start + input_ids.shape[-1], device=input_ids.device).expand(input_ids.shape)
        h, delta = self._embed(input_ids), None
        for layer in self.model.layers:
            h, delta = layer(h, delta, positions, self.cos_sin, meta, cache)
        if cache is not None and cu_seqlens is not None:
            cache.advance_varlen(cu_seqlens)
        elif cache is not None:
            cache.advance(input_ids.shape[-1])
        return self.model.norm(delta, h)[0]

    def forward(self, input_ids, positions=None, labels=None, cu_seqlens=None, cache=None, *, max_seqlen=None):
        """Logits, or with ``labels`` the loss (see the class docstring). ``max_seqlen``: the longest document
        of ``cu_seqlens`` when the caller knows it (saves reading cu_seqlens back from the device)."""
        h = self._hidden(input_ids, positions, cu_seqlens, cache, max_seqlen=max_seqlen)
        if labels is None:
            logits = self.lm_head(h)
            # packed documents run flat; the logits take the input's shape back ((1, tokens) -> (1, tokens, vocab))
            return logits.view(*input_ids.shape, logits.shape[-1]) if cu_seqlens is not None else logits
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"Llama: argument 'labels' must be a tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"Llama: argument 'labels' must hold integer token ids (int64), got {labels.dtype}")
        if labels.numel() != h.shape[:-1].numel():
            raise ValueError(f"Llama: argument 'labels' must have the shape of 'input_ids' {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        labels = labels.reshape(h.shape[:-1]).long()
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        if cu_seqlens is not None:  # the last token of a document predicts nothing
            shifted = shifted.clone()
            shifted[torch.as_tensor(cu_seqlens, device=shifted.device)[1:].long() - 1] = -100  # a list works too
        # The loss comes back in float32 whatever the model's dtype, as transformers' does: one bf16 rounding
        # of the mean quantized logged losses to steps of ~0.2-0.4%.
        if not isinstance(self.lm_head, nn.Linear):  # a quantized LM head (quantize_model with skip=()): via logits
            logits = self.lm_head(h).float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1))
        # the fused kernels' float32 mean (under torch.autocast their matmuls run in the autocast dtype, as
        # torch's linear)
        return _linear_cross_entropy(h, self.lm_head.weight, shifted, float32_loss=True)

    # ---- generation ----
    def new_tokens_fit(self, prompt_len: int) -> int:
        """The most new tokens generate() samples after a prompt of ``prompt_len`` tokens: positions run to
        prompt_len + new - 2 (the last new token is sampled, never fed back), below max_position_embeddings."""
        return max(0, self.config.max_position_embeddings - prompt_len + 1)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt (batch, seq) + up to max_new_tokens sampled tokens, with a contiguous KV cache.

        temperature 0 is greedy; top_k / top_p filter the distribution first. Generation stops
        when every row has produced an eos (the config's when eos_token_id is None); finished
        rows are padded with their eos. The ids come back in the prompt's dtype (int64 or int32), as an
        ordinary tensor (usable with autograd and in-place edits, as transformers' generate returns them).
        max_new_tokens, top_k and eos_token_id take Python ints, other integers (numpy's) and 0-d
        integer tensors; eos_token_id also a list (or 1-D tensor) of them; temperature and top_p any real
        number or 0-d tensor.
        """
        out = self._generate(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
        # the loop runs in inference mode (no version counters to keep); its result leaves it as a plain tensor,
        # unless the caller is in inference mode itself
        return out if torch.is_inference_mode_enabled() else out.clone()

    @torch.inference_mode()
    def _generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator):
        self._check_ids(input_ids)
        n = _as_int(max_new_tokens)
        if n is None or n < 0:
            raise ValueError(f"generate: argument 'max_new_tokens' must be a non-negative int, got {max_new_tokens!r}")
        max_new_tokens = n
        t = 0.0 if temperature is None else _as_float(temperature)
        if t is None or t != t or t < 0:
            raise ValueError(f"generate: argument 'temperature' must be a real number >= 0 (0: greedy), got "
                             f"{temperature!r}")
        temperature = t
        if top_k is not None:
            k = _as_int(top_k)
            if k is None or k < 0:
                raise ValueError(f"generate: argument 'top_k' must be None or an int >= 0 (0: off), got {top_k!r}")
            top_k = k
        if top_p is not None:
            p = _as_float(top_p)
            if p is None or not 0 < p <= 1:
                raise ValueError(f"generate: argument 'top_p' must be None or a real number in (0, 1], got {top_p!r}")
            top_p = p
        if input_ids.dim() not in (1, 2) or input_ids.shape[-1] == 0:
            raise ValueError(f"generate: argument 'input_ids' must be a non-empty (batch, seq) or (seq,) prompt, "
                             f"got shape {tuple(input_ids.shape)}")
        squeeze = input_ids.dim() == 1
        ids = input_ids[None] if squeeze else input_ids
        b, s = ids.shape
        if s > self.config.max_position_embeddings or max_new_tokens > self.new_tokens_fit(s):
            raise ValueError(f"generate: prompt ({s}) + max_new_tokens ({max_new_tokens}) - 1 exceeds "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        eos = self.config.eos_ids if eos_token_id is None else _eos_list(eos_token_id)
        eos_t = torch.tensor(eos, device=ids.device, dtype=ids.dtype)
        w = self.model.embed_tokens.weight  # dtype and device of the cache (the LM head may be quantized)
        cache = KVCache(self.config.num_hidden_layers, b, s + max_new_tokens, self.config.num_key_value_heads,
                        self.config.head_dim, w.dtype, w.device)
        out = [ids]
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        x = ids
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden_states(x, cache=cache)[:, -1]).float()
            nxt = sample(logits, temperature, top_k, top_p, generator).to(ids.dtype)  # the prompt's dtype
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
    def from_pretrained(cls, path, dtype: torch.dtype | str | None = None, device=None, *,
                        torch_dtype: torch.dtype | str | None = None) -> "Llama":
        """Reads config.json and *.safetensors (sharded index too) from ``path``, without transformers.

        dtype: torch.float32 / bfloat16 / float16 (or its name); None or "auto" keeps the stored dtype.
        ``torch_dtype`` is accepted as an alias (transformers' older name)."""
        from thrifty.models.hf import load_pretrained
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"from_pretrained: got both dtype={dtype!r} and torch_dtype={torch_dtype!r}")
            dtype = torch_dtype
        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size: int | str | None = None) -> None:
        """config.json + model.safetensors (see thrifty.models.hf.save_pretrained); max_shard_size: bytes (int)
        or a string as transformers takes it ("5GB", "500MB", "20KB": powers of 1000; "2GiB": of 1024)."""
        from thrifty.models.hf import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Llama":
        """A freshly initialised model of a preset ("tiny" ~10M parameters, "small" ~125M), config fields
        overridable (vocab_size=..., say)."""
        return cls(LlamaConfig.preset(name, **overrides)).init_weights()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _as_float(v) -> float | None:
    """v as a Python float: a real number (numpy's too) or a 0-d real tensor; None for bools and anything else."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.dtype.is_complex:
            return None
        return float(v.item())
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    return float(v)


def _as_int(v) -> int | None:
    """v as a Python int: an int, another numbers.Integral (numpy's) or a 0-d integer tensor (operator.index);
    None for bools, floats and anything else (the caller names the argument)."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.dtype.is_floating_point or v.dtype.is_complex:
            return None
        return int(v.item())
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # np.bool_ is not Integral
        return None
    return operator.index(v)


def _eos_list(eos_token_id) -> list[int]:
    """generate's eos_token_id (not None): one integer, or a list / tuple / 1-D tensor of them."""
    one = _as_int(eos_token_id)
    if one is not None:
        return [one]
    items = None
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.dim() == 1:
            items = list(eos_token_id)
    elif isinstance(eos_token_id, (list, tuple)):
        items = list(eos_token_id)
    ids = None if items is None else [_as_int(x) for x in items]
    if ids is None or any(i is None for i in ids):
        raise ValueError(f"generate: argument 'eos_token_id' must be None, an int or a list of ints, "
                         f"got {eos_token_id!r}")
    return ids


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
