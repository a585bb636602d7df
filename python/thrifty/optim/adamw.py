"""Fused AdamW and 8-bit AdamW."""
from __future__ import annotations

import torch

from thrifty.ops.optim import QUANT_BLOCK, create_dynamic_map, quantize_blockwise
from thrifty.optim._base import FusedOptimizer, _check_finite, _check_torch_flags

_ops = torch.ops.thrifty


def _check_adam_hparams(lr, betas, eps, weight_decay):
    _check_finite("lr", lr, lo=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2) (got {betas!r})")
    _check_finite("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
    _check_finite("betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True)
    _check_finite("eps", eps, lo=0.0)
    _check_finite("weight_decay", weight_decay, lo=0.0)  # torch.optim.AdamW refuses a negative one too


class AdamW(FusedOptimizer):
    """AdamW (torch.optim.AdamW's math, decoupled weight decay) as one fused multi-tensor step.

    Args:
        params: iterable of tensors or param-group dicts (float32, bfloat16 or float16).
        lr: a real number (float, int, numpy scalar) or one-value tensor (a tensor is read on device: no
            sync, no recompilation).
        betas, eps, weight_decay: as torch.optim.AdamW.
        master_weights: keep a float32 master copy of every bfloat16/float16 param; the step
            updates the master and writes the rounded value into the param in the same pass.
        max_grad_norm: clip the global L2 norm of all grads to this (clip_grad_norm_'s
            coefficient min(1, max_norm / (norm + 1e-6))), applied inside the step.
        skip_nonfinite: skip the whole step (params, moments and step counts untouched) when any
            grad element is inf/nan; reported by ``last_step_skipped`` / ``skipped_steps``. The check reuses
            the clipping norm, else costs one read of the grads. Finite grads whose float32 norm
            overflows (|g| ~1e18 and up) step as in torch.optim on CPU (a max |g| pass, run only when the
            norm is not finite, tells them from an inf/nan element); on CUDA, where that pass would cost a
            read of the grads every step, they skip. Clipping an overflowed norm gives clip_grad_norm_'s
            coefficient, 0. Under torch.amp.GradScaler the
            scaler's found_inf is used instead.
        amsgrad, maximize, foreach, fused, capturable, differentiable: torch.optim.AdamW's flags, for
            drop-in use. foreach / fused take any bool or None (they pick among torch's implementations of
            the same step; thrifty always runs its own fused one); the others only at torch's defaults
            (False): thrifty implements none of them, so True raises. They are not stored in param_groups.

    Moments (and masters) are float32 whatever the param dtype.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, master_weights=False,
                 max_grad_norm=None, skip_nonfinite=True, amsgrad=False, maximize=False, foreach=None, fused=None,
                 capturable=False, differentiable=False):
        flags = dict(amsgrad=amsgrad, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                     differentiable=differentiable)
        _check_torch_flags(type(self).__name__, flags)
        _check_adam_hparams(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        master_weights=bool(master_weights))
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)

    _float_moments = ("exp_avg", "exp_avg_sq")
    _state_keys = ("step", "exp_avg", "exp_avg_sq")

    def _validate_group(self, group):
        _check_adam_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _init_float_state(self, p, group, state):
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if group.get("master_weights", False) and p.dtype != torch.float32:
            state["master"] = p.detach().float().contiguous()

    def _init_state(self, p, group, state):
        self._init_float_state(p, group, state)

    def _step_float(self, group, params, grads, states, lr, coef, found):
        b1, b2 = group["betas"]
        masters = [s["master"] for s in states] if "master" in states[0] else []
        _ops.adamw_step(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], masters,
                        [s["step"] for s in states], lr, float(b1), float(b2), float(group["eps"]),
                        float(group["weight_decay"]), coef, found)

    def _step_bucket(self, key, group, params, grads, states, lr, coef, found):
        self._step_float(group, params, grads, states, lr, coef, found)


def _zero_code(qmap: torch.Tensor) -> int:
    """The code of 0 in a quantization map."""
    return int((qmap == 0).nonzero()[0])


class AdamW8bit(AdamW):
    """AdamW with 8-bit moments: m and v stored as uint8 codes of the bitsandbytes dynamic maps
    (signed for m, unsigned for v) with a float32 absmax per 256-element block: about 2 bytes of
    state per parameter instead of 8. Tensors with fewer than ``min_8bit_size`` (4096) elements
    keep float32 moments. Same interface and semantics as :class:`AdamW` otherwise; the param
    update uses the freshly computed float moments, which are then requantized. A float state loaded
    from :class:`AdamW` or ``torch.optim.AdamW`` is quantized at load for the tensors that take 8-bit state.
    """

    _pickled_attrs = FusedOptimizer._pickled_attrs + ("min_8bit_size",)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, master_weights=False,
                 max_grad_norm=None, skip_nonfinite=True, min_8bit_size=4096, amsgrad=False, maximize=False,
                 foreach=None, fused=None, capturable=False, differentiable=False):
        super().__init__(params, lr, betas, eps, weight_decay, master_weights=master_weights,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)
        self.min_8bit_size = int(min_8bit_size)
        self._qmaps: dict = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("min_8bit_size", 4096)
        self._qmaps = {}

    def _qmap(self, device):
        q = self._qmaps.get(device)
        if q is None:
            q = (create_dynamic_map(True).to(device), create_dynamic_map(False).to(device))
            self._qmaps[device] = q
        return q

    def _init_state(self, p, group, state):
        if p.numel() < self.min_8bit_size:
            self._init_float_state(p, group, state)
            return
        qm, qv = self._qmap(p.device)
        nb = (p.numel() + QUANT_BLOCK - 1) // QUANT_BLOCK
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.full(p.shape, _zero_code(qm), dtype=torch.uint8, device=p.device)
        state["exp_avg_sq"] = torch.full(p.shape, _zero_code(qv), dtype=torch.uint8, device=p.device)
        state["absmax_m"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        state["absmax_v"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        if group.get("master_weights", False) and p.dtype != torch.float32:
            state["master"] = p.detach().float().contiguous()

    def _check_loaded_state(self, p, state, where):
        if "absmax_m" not in state:  # float moments (a small tensor, or a state saved by AdamW / torch.optim.AdamW)
            super()._check_loaded_state(p, state, where)
            if p.numel() >= self.min_8bit_size and "exp_avg" in state and "exp_avg_sq" in state:
                # a tensor that takes 8-bit state here: quantized now (kept as float, the 2 B/param state this
                # optimizer is for never came, silently), with the kernels' own rule
                qm, qv = self._qmap(p.device)
                state["exp_avg"], state["absmax_m"] = quantize_blockwise(state["exp_avg"], qm)
                state["exp_avg_sq"], state["absmax_v"] = quantize_blockwise(state["exp_avg_sq"], qv)
            return
        self._check_state_keys(state, where, ("step", "exp_avg", "exp_avg_sq", "absmax_m", "absmax_v"),
                               self._optional_state_keys)
        for k in ("exp_avg", "exp_avg_sq"):
            v = state.get(k)
            if v is None or v.dtype != torch.uint8 or tuple(v.shape) != tuple(p.shape):
                got = "missing" if v is None else f"{v.dtype} {tuple(v.shape)}"
                raise ValueError(f"AdamW8bit.load_state_dict: state {k!r} of param {where}: expected uint8 codes of "
                                 f"shape {tuple(p.shape)} beside its absmax, got {got}")
        nb = (p.numel() + QUANT_BLOCK - 1) // QUANT_BLOCK
        for k in ("absmax_m", "absmax_v"):
            a = state[k]
            if not isinstance(a, torch.Tensor) or a.numel() != nb:
                got = f"shape {list(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"AdamW8bit.load_state_dict: state {k!r} of param {where}: expected {nb} block "
                                 f"scales (one per {QUANT_BLOCK} elements), got {got}")
        # states saved before a positive v kept the map's smallest code can hold v at code 0 under a nonzero m:
        # the next steps would move such an element by m / eps. They take the smallest code, as the kernels now do.
        qm, _ = self._qmap(p.device)
        cm, cv = state["exp_avg"], state["exp_avg_sq"]
        poisoned = (cv == 0) & (cm != _zero_code(qm))
        poisoned &= (state["absmax_v"].to(cv.device) > 0).repeat_interleave(QUANT_BLOCK)[:cv.numel()].view(cv.shape)
        state["exp_avg_sq"] = torch.where(poisoned, torch.ones_like(cv), cv)

    def _bucket_key(self, p, group, state):
        return (p.device, p.dtype, "master" in state, "absmax_m" in state)

    def _step_bucket(self, key, group, params, grads, states, lr, coef, found):
        if not key[3]:
            return self._step_float(group, params, grads, states, lr, coef, found)
        b1, b2 = group["betas"]
        qm, qv = self._qmap(params[0].device)
        masters = [s["master"] for s in states] if key[2] else []
        _ops.adamw8bit_step(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                            [s["absmax_m"] for s in states], [s["absmax_v"] for s in states], qm, qv, masters,
                            [s["step"] for s in states], lr, float(b1), float(b2), float(group["eps"]),
                            float(group["weight_decay"]), coef, found)
