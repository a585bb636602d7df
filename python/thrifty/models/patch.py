"""thrifty.patch_hf: thrifty kernels inside an existing transformers Llama / Mistral / Qwen2 model.

In place, on the instance (transformers stays optional: nothing here imports it):
- every *RMSNorm -> thrifty.ops.rms_norm
- every MLP -> the thrifty SwiGLU path of thrifty.models (same gate/up/down weights)
- attention -> thrifty rotary + the model's attention interface (thrifty.models.attention.attend)
  (transformers' own KV cache included, so generate works) whenever there is no explicit mask;
  with a padding mask (batched padded input) the layer runs transformers' own attention code,
  since the attention interface has no arbitrary-mask case.
- the loss: forward(..., labels=...) uses thrifty.ops.linear_cross_entropy on the final
  hidden states (no logits materialised; logits are returned only in eval mode).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from thrifty.models import _kernels as K
from thrifty.models.attention import AttnMeta, attend
from thrifty.ops import linear_cross_entropy, rms_norm, swiglu

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _norm_forward(self, x):
    return rms_norm(x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(orig):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        if attention_mask is not None or position_embeddings is None:
            return orig(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                        cache=cache, **kwargs)
        lead = hidden_states.shape[:-1]
        d = self.head_dim
        q = self.q_proj(hidden_states).view(*lead, -1, d)
        k = self.k_proj(hidden_states).view(*lead, -1, d)
        v = self.v_proj(hidden_states).view(*lead, -1, d)
        # transformers' cos/sin (any rope type, attention scaling included) as a per-token rotary cache
        cos, sin = position_embeddings
        cos = cos.expand(*lead, d)
        sin = sin.expand(*lead, d)
        cache_cs = torch.cat([cos[..., : d // 2], sin[..., : d // 2]], dim=-1).reshape(-1, d).float()
        positions = torch.arange(cache_cs.shape[0], device=q.device).view(lead)
        q, k = K.rotary(q, k, positions, cache_cs)
        if cache is not None:  # transformers' cache keeps (batch, heads, seq, d); queries are its last tokens
            kt, vt = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = kt.transpose(1, 2), vt.transpose(1, 2)
        window = getattr(self, "sliding_window", None) or kwargs.get("sliding_window")
        out = attend(q, k, v, AttnMeta(scale=self.scaling, window=window))
        return self.o_proj(out.reshape(*lead, -1)), None

    return forward


def _causal_lm_forward(orig):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        if labels is None:
            return orig(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        h = out.last_hidden_state
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(h.device)
        if num_items is None:
            loss = linear_cross_entropy(h, self.lm_head.weight, shifted)
        else:
            loss = linear_cross_entropy(h, self.lm_head.weight, shifted, reduction="sum") / num_items
        logits = None if self.training else self.lm_head(h)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(out, "past_key_values", None))

    return forward


def patch_hf(model):
    """Swaps thrifty kernels into a transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM
    in place and returns it. Logits match the unpatched model within the dtype's tolerance."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"thrifty.patch_hf: model must be one of {', '.join(SUPPORTED)}, got {name}")
    if getattr(model, "_thrifty_patched", False):
        return model
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"thrifty.patch_hf: config field 'hidden_act' = {cfg.hidden_act!r} is not supported")
    for mod in model.modules():
        cls = type(mod).__name__
        if cls.endswith("RMSNorm"):
            mod.forward = types.MethodType(_norm_forward, mod)
        elif cls.endswith("MLP") and hasattr(mod, "gate_proj"):
            mod.forward = types.MethodType(_mlp_forward, mod)
        elif cls.endswith("Attention") and hasattr(mod, "q_proj"):
            mod.forward = types.MethodType(_attention_forward(mod.forward), mod)
            if name == "MistralForCausalLM":
                mod.sliding_window = getattr(cfg, "sliding_window", None)
    model.forward = types.MethodType(_causal_lm_forward(model.forward), model)
    model._thrifty_patched = True
    return model
