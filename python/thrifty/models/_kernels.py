"""The model's kernel choices in one place: thrifty's rotary embedding and SwiGLU MLP, and how the
linear layers multiply bf16/f16 weights on the CPU (thrifty's GEMV for decode rows, float32 copies for
many rows on CPUs without native bf16 dot products)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import thrifty
from thrifty.nn import SwiGLU as MLP  # noqa: F401  (gate_proj / up_proj / down_proj, fused silu * up)
from thrifty.ops import linear, rotary_embedding

# Below avx512_bf16, torch's bf16/f16 CPU GEMM takes a slow path (0.2 GFLOP/s vs 11 for float32
# on the shared 2-core AVX2 box), so low-precision CPU linears over >= 8 rows multiply float32
# copies there (float32 accumulation either way; one rounding of the output to the input dtype).
# Decode rows (at most _GEMV_ROWS, prefill of short prompts included) go to thrifty.ops.linear on every
# CPU instead: its GEMV streams the weight once, widening bf16/f16 in registers, at memory bandwidth.
# torch's bf16 GEMV on the AVX2 box is erratic: close to that on an idle machine, 10-30x slower with the
# cores shared, and slow for 4096 x 4096 or the LM head; converting the weights costs as much as that.
_CPU_NATIVE_BF16 = thrifty._C.cpu_isa_detected() == "avx512_bf16"
_LOWP = (torch.bfloat16, torch.float16)
_GEMV_ROWS = 16  # kLinearGemvMaxM in csrc/common/linear_params.h: the op's own GEMV / GEMM switch


def rotary(q, k, positions, cos_sin):
    """neox-style rotary of q (..., heads, d) and k (..., kv_heads, d) at positions (...)."""
    return rotary_embedding(q, k, positions, cos_sin)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) with thrifty's GEMV for few rows of bf16/f16 on the
    CPU, and float32 compute for more rows on CPUs without native bf16 dot products."""

    def forward(self, x):
        w, b = self.weight, self.bias
        if w.is_cpu and w.dtype in _LOWP:
            if (x.numel() <= _GEMV_ROWS * w.shape[1] and x.dtype is w.dtype and w.stride(-1) == 1
                    and (b is None or b.dtype is w.dtype)):
                return linear(x, w, b)
            if not _CPU_NATIVE_BF16 and x.numel() >= 8 * w.shape[1]:
                return _Float32Linear.apply(x, w, b)
        return F.linear(x, w, b)


class _Float32Linear(torch.autograd.Function):
    """y = x @ w.T + b multiplied in float32 and rounded once to x's dtype, for bf16/f16 weights.

    The same numbers as autograd through ``F.linear(x.float(), w.float(), b.float()).to(x.dtype)``, but the
    backward keeps x and w themselves and widens them again instead of saving their float32 copies: on the
    `small` preset those copies were ~340 MB of a training step's peak (every weight, twice its size)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.bias_dtype = None if b is None else b.dtype
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = gy.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ w.float()).to(x.dtype)                                  # (..., N) @ (N, K)
        if ctx.needs_input_grad[1]:
            gw = (gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype)  # (N, K)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, gw, gb


def use_fast_linear(module: nn.Module) -> nn.Module:
    """Turns every plain nn.Linear of module into :class:`Linear` in place."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module
