"""thrifty.patch_hf: thrifty kernels inside an existing transformers Llama / Mistral / Qwen2 model.

In place, on the instance (transformers stays optional: only patch_hf imports it, on a transformers model):
- every *RMSNorm -> thrifty.ops.rms_norm
- every MLP -> the thrifty SwiGLU path of thrifty.models (same gate/up/down weights)
- attention -> thrifty rotary + the model's attention interface (thrifty.models.attention.attend)
  (transformers' own KV cache included, so generate works) whenever the layer's mask is the plain
  causal (or, for Mistral, sliding-window causal) one: no mask at all, or the mask transformers builds
  from no attention_mask or an all-ones one (eager attention always builds it; sliding windows shorter
  than the input too). With padding (a 2-D mask with zeros) or a custom 4-D mask the layer runs
  transformers' own attention code, since the attention interface has no arbitrary-mask case; so it does
  when attention weights are asked for (output_attentions) and with a static cache (StaticCache layers hand
  back their whole buffer, empty slots included).
- the loss: forward(..., labels=...) uses thrifty.ops.linear_cross_entropy on the final
  hidden states (no logits materialised for the loss; ``out.logits`` is computed, with autograd,
  only when it is read), returned in float32 whatever the model's dtype, as transformers does.
"""
from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F

from thrifty.models import _kernels as K
from thrifty.models.attention import AttnMeta, attend
from thrifty.ops import rms_norm, swiglu
from thrifty.ops.loss import _linear_cross_entropy

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _norm_forward(self, x):
    return rms_norm(x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _plain_causal(attention_mask) -> bool:
    """True when the model-level attention_mask leaves the layers' masks plain causal: None, or 2-D
    (batch, seq) without padding (one host sync to read it)."""
    if attention_mask is None:
        return True
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and bool(attention_mask.all())


def _as_unbound(method, mod):
    """``method`` (a module's forward before patching) as a function of the module: a bound method of
    ``mod`` is called on the module the patched forward runs on, so a deepcopy of a patched model runs its
    own weights, not the original's; any other callable (a hook's wrapper) is called as it is."""
    if isinstance(method, types.MethodType) and method.__self__ is mod:
        return method.__func__
    return lambda _self, *args, **kwargs: method(*args, **kwargs)


def _cache_layer_is_dynamic(cache, layer_idx) -> bool:
    """Whether transformers' cache layer returns exactly the keys seen so far (DynamicCache's layers, sliding or
    not), which the attention interface's bottom-right causal alignment needs. A StaticCache layer returns its
    whole max_cache_len buffer, empty slots included: the queries would see them (its 4-D mask hides them)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx is None:
        return False
    if layer_idx < len(layers):
        return not getattr(layers[layer_idx], "is_compileable", True)
    return not getattr(cache, "is_compileable", True)  # a DynamicCache adds its layers on first update


# The 4-D masks judged plain causal, by identity, held weakly (an entry goes with its mask: after the backward
# that recomputes with it). Module-level, not in a model's state: a patched model still pickles.
_PLAIN_MASKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _mask_is_plain(state, attention_mask) -> bool:
    """state["plain_causal"]: set by the patched model forward for the duration of one call, so a mask built
    from no padding is known to be the causal one (a direct call of the inner model leaves it False). Masks so
    judged are remembered for as long as they live, so a gradient-checkpointing recompute in the backward,
    after that call returned (and after other calls), takes the same path with the same mask. Not under
    torch.compile (it traces neither id() nor weak references; compiled checkpointing recomputes in the graph)."""
    if attention_mask is None:
        return True
    if torch.compiler.is_compiling():
        return state["plain_causal"]
    if state["plain_causal"]:
        _PLAIN_MASKS[id(attention_mask)] = attention_mask
        return True
    return _PLAIN_MASKS.get(id(attention_mask)) is attention_mask


def _attention_forward(orig):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        state = self._thrifty_state
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        else:
            kwargs.pop("past_key_values", None)
        # transformers' own attention for what the attention interface does not do: a padded or custom mask,
        # attention weights asked for (output_attentions), a cache that hands back empty slots
        if (not _mask_is_plain(state, attention_mask) or position_embeddings is None or state["want_weights"]
                or (cache is not None and not _cache_layer_is_dynamic(cache, getattr(self, "layer_idx", None)))):
            return orig(self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
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


_LAZY_OUTPUT = None


def _lazy_logits_output_class():
    """CausalLMOutputWithPast whose ``logits`` are computed (lm_head of the final hidden states, with autograd)
    only when read: the fused loss never needs them, but code that reads ``out.logits`` still gets them."""
    global _LAZY_OUTPUT
    if _LAZY_OUTPUT is None:
        from collections import OrderedDict
        from dataclasses import fields

        from transformers.modeling_outputs import CausalLMOutputWithPast

        class LazyLogitsCausalLMOutput(CausalLMOutputWithPast):
            def _get_logits(self):
                v = self.__dict__.get("_logits")
                make = self.__dict__.get("_make_logits")
                if v is None and make is not None:
                    v = make()
                    self.__dict__["_logits"] = v
                    self.__dict__["_make_logits"] = None
                    self._set_logits(v)
                return v

            def _set_logits(self, v):
                self.__dict__["_logits"] = v
                if v is not None:
                    OrderedDict.__setitem__(self, "logits", v)
                    for name in self._AFTER_LOGITS:  # keep the field order (to_tuple: loss, logits, cache, ...)
                        if OrderedDict.__contains__(self, name):
                            OrderedDict.move_to_end(self, name)

            logits = property(_get_logits, _set_logits)
            _AFTER_LOGITS = tuple(f.name for f in fields(CausalLMOutputWithPast) if f.name not in ("loss", "logits"))

            def __getitem__(self, k):
                if (k == "logits" or not isinstance(k, str)) and self.__dict__.get("_make_logits") is not None:
                    self._get_logits()
                return super().__getitem__(k)

            def to_tuple(self):
                if self.__dict__.get("_make_logits") is not None:
                    self._get_logits()
                return super().to_tuple()

            # the mapping views list logits as the unpatched output does (transformers.Trainer's prediction_step
            # gathers `outputs.items()`): reading them computes the logits; `"logits" in out` does not
            def _listed(self):
                if self.__dict__.get("_make_logits") is not None:
                    self._get_logits()
                return self

            def keys(self):
                return OrderedDict.keys(self._listed())

            def values(self):
                return OrderedDict.values(self._listed())

            def items(self):
                return OrderedDict.items(self._listed())

            def __iter__(self):
                return OrderedDict.__iter__(self._listed())

            def __len__(self):
                return OrderedDict.__len__(self) + (self.__dict__.get("_make_logits") is not None)

            def __contains__(self, k):
                return (k == "logits" and self.__dict__.get("_make_logits") is not None) or OrderedDict.__contains__(
                    self, k)

        _LAZY_OUTPUT = LazyLogitsCausalLMOutput
    return _LAZY_OUTPUT


def _float32_loss(h, weight, shifted, num_items=None):
    """The fused cross-entropy of the final hidden states, in float32 whatever the model's dtype, as
    transformers' own loss (it upcasts the logits) and thrifty's Llama return it (the kernels sum in float32).
    Mean over the tokens not ignored, or the sum / num_items_in_batch when the trainer passes that."""
    if num_items is None:
        return _linear_cross_entropy(h, weight, shifted, float32_loss=True)
    total = _linear_cross_entropy(h, weight, shifted, reduction="sum", float32_loss=True)
    num = num_items.to(h.device) if isinstance(num_items, torch.Tensor) else num_items
    return total / num


def _causal_lm_forward(orig):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *args, labels=None, **kwargs):
        state = self._thrifty_state
        state["plain_causal"] = _plain_causal(attention_mask)
        want = kwargs.get("output_attentions")
        state["want_weights"] = bool(getattr(self.config, "output_attentions", False) if want is None else want)
        try:
            return inner(self, input_ids, attention_mask, position_ids, *args, labels=labels, **kwargs)
        finally:
            state["plain_causal"] = state["want_weights"] = False

    def inner(self, input_ids, attention_mask, position_ids, *args, labels=None, **kwargs):
        if args:  # positional past_key_values / cache, inputs_embeds, labels, ... (transformers' order)
            return orig(self, input_ids, attention_mask, position_ids, *args, labels=labels, **kwargs)
        if labels is None:
            return orig(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         return_dict=True, **kwargs)
        h = out.last_hidden_state
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(h.device)
        loss = _float32_loss(h, self.lm_head.weight, shifted, num_items)

        def make_logits():
            hs = h
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hs = h[:, -logits_to_keep:, :]
            elif isinstance(logits_to_keep, torch.Tensor):
                hs = h[:, logits_to_keep, :]
            return self.lm_head(hs)

        if torch.compiler.is_compiling():  # torch.compile traces neither the lazy class nor its property
            from transformers.modeling_outputs import CausalLMOutputWithPast as cls
        else:
            cls = _lazy_logits_output_class()
        names = self._thrifty_state["output_fields"]
        extra = {"hidden_states": getattr(out, "hidden_states", None), "attentions": getattr(out, "attentions", None)}
        cache_name = "cache" if "cache" in names else "past_key_values"
        extra[cache_name] = out[cache_name] if cache_name in out.keys() else None
        kept = {k: v for k, v in extra.items() if k in names}
        if torch.compiler.is_compiling():
            res = cls(loss=loss, logits=make_logits(), **kept)
            return res if return_dict else res.to_tuple()
        res = cls(loss=loss, **kept)
        res.__dict__["_make_logits"] = make_logits
        if not return_dict:
            res._get_logits()
            return res.to_tuple()
        return res

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
    # shared by the patched forwards of this model, kept on its modules (a deepcopy gets its own)
    from dataclasses import fields

    from transformers.modeling_outputs import CausalLMOutputWithPast
    state = {"plain_causal": False, "want_weights": False,
             # read here, not in forward: torch.compile does not trace dataclasses.fields
             "output_fields": frozenset(f.name for f in fields(CausalLMOutputWithPast))}
    model._thrifty_state = state
    for mod in model.modules():
        cls = type(mod).__name__
        if cls.endswith("RMSNorm"):
            mod.forward = types.MethodType(_norm_forward, mod)
        elif cls.endswith("MLP") and hasattr(mod, "gate_proj"):
            mod.forward = types.MethodType(_mlp_forward, mod)
        elif cls.endswith("Attention") and hasattr(mod, "q_proj"):
            mod._thrifty_state = state
            mod.forward = types.MethodType(_attention_forward(_as_unbound(mod.forward, mod)), mod)
            if name == "MistralForCausalLM":
                mod.sliding_window = getattr(cfg, "sliding_window", None)
    model.forward = types.MethodType(_causal_lm_forward(_as_unbound(model.forward, model)), model)
    model._thrifty_patched = True
    return model
