"""Fused Lion (Chen et al., Symbolic Discovery of Optimization Algorithms)."""
from __future__ import annotations

import torch

from thrifty.optim._base import FusedOptimizer, _check_finite, _check_torch_flags

_ops = torch.ops.thrifty


def _check_lion_hparams(lr, betas, weight_decay):
    _check_finite("lr", lr, lo=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2) (got {betas!r})")
    _check_finite("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
    _check_finite("betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True)
    _check_finite("weight_decay", weight_decay, lo=0.0)


class Lion(FusedOptimizer):
    """Lion as one fused multi-tensor step; one float32 state tensor (exp_avg) per param::

        c = b1 m + (1 - b1) g;   p = p (1 - lr wd) - lr sign(c);   m = b2 m + (1 - b2) g

    Same extras as :class:`thrifty.optim.AdamW`: master_weights, max_grad_norm, skip_nonfinite,
    GradScaler support, lr as a tensor. maximize, foreach, fused, capturable, differentiable: the
    torch.optim flags, accepted as in AdamW (foreach / fused any bool or None, the others at torch's
    defaults only; Lion has no amsgrad).
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, master_weights=False,
                 max_grad_norm=None, skip_nonfinite=True, maximize=False, foreach=None, fused=None, capturable=False,
                 differentiable=False):
        _check_torch_flags(type(self).__name__, dict(maximize=maximize, foreach=foreach, fused=fused,
                                                     capturable=capturable, differentiable=differentiable))
        _check_lion_hparams(lr, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, master_weights=bool(master_weights))
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)

    def _validate_group(self, group):
        _check_lion_hparams(group["lr"], group["betas"], group["weight_decay"])

    _float_moments = ("exp_avg",)
    _state_keys = ("exp_avg",)

    def _init_state(self, p, group, state):
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if group.get("master_weights", False) and p.dtype != torch.float32:
            state["master"] = p.detach().float().contiguous()

    def _step_bucket(self, key, group, params, grads, states, lr, coef, found):
        b1, b2 = group["betas"]
        masters = [s["master"] for s in states] if key[2] else []
        _ops.lion_step(params, grads, [s["exp_avg"] for s in states], masters, lr, float(b1), float(b2),
                       float(group["weight_decay"]), coef, found)
