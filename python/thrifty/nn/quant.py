"""QuantLinear: a drop-in nn.Linear with int8 or int4 weights (W8A16, W4A16, W8A8)."""
from __future__ import annotations

import math

import torch
from torch import nn

from thrifty.ops import quant as qops
from thrifty.quant import formats as F


def _check_layer_args(where: str, in_features: int, bits, group_size, act_bits) -> None:
    """The layer options, checked before any work, each error naming the argument."""
    for name, v in (("bits", bits), ("group_size", group_size), ("act_bits", act_bits)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{where}: argument '{name}' must be an int, got {type(v).__name__} ({v!r})")
    if bits not in (4, 8):
        raise ValueError(f"{where}: argument 'bits' must be 4 or 8, got {bits}")
    if act_bits not in (8, 16):
        raise ValueError(f"{where}: argument 'act_bits' must be 16 or 8, got {act_bits}")
    if act_bits == 8 and bits != 8:
        raise ValueError(f"{where}: act_bits=8 (int8 activations) needs bits=8 weights (W8A8), got bits={bits}")
    if bits == 4:
        if group_size <= 0 or group_size % 32:
            raise ValueError(f"{where}: argument 'group_size' must be a positive multiple of 32 (32, 64, 128) for "
                             f"bits=4, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"{where}: in_features={in_features} is not a multiple of group_size={group_size} "
                             "(bits=4 quantizes whole groups of group_size input features)")


def _check_import_bias(where: str, bias, n: int, device: torch.device) -> None:
    """An imported layer's bias, checked before any copy (torch's copy_ error names no argument)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{where}: argument 'bias' must be a tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"{where}: argument 'bias' must be a floating-point tensor, got {bias.dtype}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: argument 'bias' must have shape (out_features,) = ({n},) (N from qweight), "
                         f"got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{where}: argument 'bias' is on {bias.device}, qweight on {device}: they must be on the "
                         "same device")


class _W8A8Linear(torch.autograd.Function):
    """W8A8 forward (per-token int8 activations, int32-exact int8 GEMM). Backward straight through the
    activation rounding, as for W8A16: grad_x = grad_y @ dequant(W), grad_bias = sum of grad_y (the
    int8 ops have no autograd of their own: without this, x would silently get no gradient)."""

    @staticmethod
    def forward(x, qweight, scales, bias):
        xq, xs = qops.quantize_per_token(x)
        return qops.int8_linear(xq, xs, qweight, scales, bias, out_dtype=x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, qweight, scales, bias = inputs
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(qweight, scales)

    @staticmethod
    def backward(ctx, grad_y):
        qweight, scales = ctx.saved_tensors
        grad_x, grad_bias = qops.frozen_weight_grads(grad_y, qweight, scales, None, 8, -1, ctx.x_dtype,
                                                     ctx.bias_dtype, ctx.needs_input_grad[0],
                                                     ctx.needs_input_grad[3])
        return grad_x, None, None, grad_bias


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + bias with packed weights (docs/QUANT_FORMATS.md, format version 1).

    Buffers: ``qweight`` (int8 (N, K) for bits=8, uint8 (N, K/2) for bits=4), ``scales`` float32
    ((N,) or (N, K/G)), ``zeros`` float32 (N, K/G) (bits=4), optional ``bias`` (N,), optional ``perm``
    int64 (K,) (input features reordered: act-order GPTQ), optional ``smooth`` float32 (K,) (W8A8
    SmoothQuant factors not folded into a previous layer: x is divided by them; in the original
    input-feature order, applied before the ``perm`` gather).
    ``act_bits=8`` (W8A8, bits=8 only) quantizes activations per token and multiplies in int8; its
    backward passes straight through the activation rounding (grad_x = grad_y @ dequantize()).
    ``weight`` (read-only property): the dequantized weight in ``weight_dtype`` (the float layer's
    weight dtype; it follows ``.to(dtype)``), for code that reads ``.weight`` instead of calling the
    layer; it is neither a parameter nor a buffer, so it is not in state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: int = 128, act_bits: int = 16, device=None, dtype: torch.dtype | None = None,
                 act_order: bool = False, smooth: bool = False):
        super().__init__()
        _check_layer_args("QuantLinear", in_features, bits, group_size, act_bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.act_bits = bits, act_bits
        self.group_size = group_size if bits == 4 else -1
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
            self.zeros = None
        else:
            ng = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, ng, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None
        self.register_buffer("perm", torch.arange(in_features, device=device) if act_order else None)
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        self.weight_dtype = dtype or torch.float32

    def _apply(self, fn, recurse=True):
        """model.to(dtype) / .half() / .bfloat16() move the layer but keep its scales, zero points and smoothing
        factors float32 (the kernels' format; rounding them would change the weights)."""
        keep = {n: getattr(self, n) for n in ("scales", "zeros", "smooth") if getattr(self, n, None) is not None}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:
                setattr(self, n, old.to(device=new.device))
        # weight_dtype follows .to(dtype) / .half() as a float weight would: ask fn what it does to one
        try:
            probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.qweight.device))
        except (RuntimeError, TypeError, ValueError, AssertionError):  # an fn for real tensors only: keep it
            probe = None
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.weight_dtype = probe.dtype
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out_features, in_features) weight in ``weight_dtype``, recomputed on each
        read and read-only, for code that reads a linear layer's ``.weight`` instead of calling it
        (nn.TransformerEncoderLayer's inference fast path, F.multi_head_attention_forward): it then
        computes with the quantized weights. W8A8's activation quantization only happens in forward."""
        return self.dequantize().to(self.weight_dtype)

    # ---- forward ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input must have in_features={self.in_features} in its last dimension, "
                             f"got shape {tuple(x.shape)}")
        dev = x.device.type
        if (x.is_floating_point() and x.dtype != torch.float64 and torch._C._is_autocast_available(dev)
                and torch.is_autocast_enabled(dev)):
            x = x.to(torch.get_autocast_dtype(dev))  # as nn.Linear under autocast (the W8A8 path has no op rule)
        # smooth is in the original feature order (as the float layer's columns): divide before the
        # act-order gather, which reorders x into the packed weight's column order
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        bias = self.bias
        if bias is not None and bias.dtype not in (x.dtype, torch.float32):
            bias = bias.to(x.dtype)
        if self.act_bits == 8:
            if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
                return _W8A8Linear.apply(x, self.qweight, self.scales, bias)
            return _W8A8Linear.forward(x, self.qweight, self.scales, bias)  # no autograd node to build
        return qops.quant_linear(x, self.qweight, self.scales, self.zeros, bits=self.bits,
                                 group_size=self.group_size, bias=bias)

    def dequantize(self) -> torch.Tensor:
        """float32 (out_features, in_features): the weight exactly as the kernels see it (in the
        original input-feature order, smoothing folded back in)."""
        w = qops.dequantize(self.qweight, self.scales, self.zeros, bits=self.bits, group_size=self.group_size)
        if self.perm is not None:  # packed column j is input feature perm[j]: back to the original order
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        if self.smooth is not None:  # (K,) in the original order, so only after undoing perm
            w = w / self.smooth.float()[None, :]
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, act_bits={self.act_bits}"
                + (", act_order" if self.perm is not None else ""))

    def quant_config(self) -> dict:
        """What a saved checkpoint needs to rebuild this layer (see thrifty.quant.save_quantized)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size, "act_bits": self.act_bits,
                "act_order": self.perm is not None, "smooth": self.smooth is not None}

    # ---- constructors ----
    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 8, group_size: int = 128, method: str = "rtn",
                   act_bits: int = 16, calibration: torch.Tensor | None = None, *, damp: float = 0.01,
                   act_order: bool = True, smooth: torch.Tensor | None = None) -> "QuantLinear":
        """Quantizes an nn.Linear.

        bits=8: symmetric per output channel; bits=4: group-wise asymmetric (group_size).
        method="rtn" rounds to nearest; method="gptq" needs ``calibration``: input activations
        (tokens, in_features) (or a (K, K) Hessian 2 X^T X / n given as ``calibration`` with
        K == tokens is taken as activations: pass activations). act_bits=8 makes a W8A8 layer.
        smooth: optional (in_features,) SmoothQuant factors kept in the layer (x / smooth,
        W * smooth); use thrifty.quant.smooth_fold to fold them into the previous layer instead.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float: expected an nn.Linear, got {type(linear).__name__}")
        if method not in ("rtn", "gptq"):
            raise ValueError(f"QuantLinear.from_float: method must be 'rtn' or 'gptq', got {method!r}")
        k, n = linear.in_features, linear.out_features
        _check_layer_args("QuantLinear.from_float", k, bits, group_size, act_bits)
        where = "QuantLinear.from_float"
        if smooth is not None:
            if not isinstance(smooth, torch.Tensor):
                raise TypeError(f"{where}: argument 'smooth' must be a tensor or None, got {type(smooth).__name__}")
            if tuple(smooth.shape) != (k,):
                raise ValueError(f"{where}: argument 'smooth' must have shape (in_features,) = ({k},), got "
                                 f"{tuple(smooth.shape)}")
            if not smooth.is_floating_point() or not bool((torch.isfinite(smooth) & (smooth > 0)).all()):
                raise ValueError(f"{where}: argument 'smooth' must hold finite positive floats (x is divided by it)")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
            raise ValueError(f"{where}: argument 'damp' must be a finite number >= 0, got {damp!r}")
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.float()[None, :]
        perm = None
        if method == "gptq":
            if calibration is None:
                raise ValueError("QuantLinear.from_float: method='gptq' needs calibration activations "
                                 "(tokens, in_features)")
            if not isinstance(calibration, torch.Tensor):
                raise TypeError(f"{where}: argument 'calibration' must be a tensor of input activations "
                                f"(tokens, in_features), got {type(calibration).__name__}")
            if not calibration.is_floating_point():
                raise TypeError(f"{where}: argument 'calibration' must be a floating-point tensor, got "
                                f"{calibration.dtype}")
            if calibration.dim() == 0 or calibration.shape[-1] != k:
                raise ValueError(f"QuantLinear.from_float: calibration must have in_features={k} columns, "
                                 f"got shape {tuple(calibration.shape)}")
            from thrifty.quant.gptq import gptq_quantize, hessian_from_inputs
            xc = calibration.detach().float()
            if smooth is not None:
                xc = xc / smooth.to(xc.device).float()
            if not bool(torch.isfinite(xc).all()):
                raise ValueError(f"{where}: argument 'calibration' holds inf or nan (GPTQ needs finite activations)")
            if xc.numel() == 0:
                raise ValueError(f"{where}: argument 'calibration' has no tokens (shape {tuple(calibration.shape)})")
            h, cnt = hessian_from_inputs(xc)
            q, s, z, perm = gptq_quantize(w, 2 * h / max(cnt, 1), bits=bits, group_size=group_size, damp=damp,
                                          act_order=act_order)
        elif bits == 8:
            q, s = F.quantize_rtn_w8(w)
            z = None
        else:
            q, s, z = F.quantize_rtn_w4(w, group_size)
        dev = linear.weight.device
        m = cls(k, n, linear.bias is not None, bits=bits, group_size=group_size, act_bits=act_bits, device=dev,
                dtype=linear.bias.dtype if linear.bias is not None else None, act_order=perm is not None,
                smooth=smooth is not None)
        m.qweight.copy_(q if bits == 8 else F.pack_int4(q))
        m.scales.copy_(s)
        if bits == 4:
            m.zeros.copy_(z)
        if perm is not None:
            m.perm.copy_(perm)
        if smooth is not None:
            m.smooth.copy_(smooth.float())
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        m.weight_dtype = linear.weight.dtype
        return m

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None, bits: int = 4) -> "QuantLinear":
        """From a GPTQ checkpoint: qweight int32 (K/8, N) packed along K, qzeros int32 (groups, N/8)
        (stored zero + 1 convention, as vLLM and exllama read it), scales (groups, N), g_idx (K,)
        (act-order) or None, bias (N,) float or None. The group size follows from the shapes. Bad types,
        dtypes, shapes or devices raise TypeError / ValueError naming the argument."""
        where = "QuantLinear.from_gptq"
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"{where}: argument 'bits' must be an int, got {type(bits).__name__} ({bits!r})")
        if bits != 4:
            raise ValueError(f"{where}: only 4-bit GPTQ checkpoints are supported, got bits={bits}")
        try:  # every packed tensor's type, dtype, shape and device, before anything is built
            qw, s, z, perm, gs = F.from_gptq_tensors(qweight, qzeros, scales, g_idx)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        n, k = qw.shape[0], qw.shape[1] * 2
        _check_import_bias(where, bias, n, qweight.device)
        m = cls(k, n, bias is not None, bits=4, group_size=gs, device=qweight.device,
                dtype=bias.dtype if bias is not None else None, act_order=perm is not None)
        m.qweight.copy_(qw)
        m.scales.copy_(s)
        m.zeros.copy_(z)
        if perm is not None:
            m.perm.copy_(perm)
        if bias is not None:
            m.bias.copy_(bias)
        m.weight_dtype = scales.dtype  # the checkpoint's compute dtype (float16 for most)
        return m

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, group_size: int = 128) -> "QuantLinear":
        """From an AWQ (GEMM) checkpoint: qweight int32 (K, N/8) packed along N in AWQ's nibble order
        [0, 2, 4, 6, 1, 3, 5, 7], qzeros int32 (K/G, N/8) likewise, scales (K/G, N), bias (N,) float.
        group_size=None takes it from the shapes. Bad types, dtypes, shapes or devices raise
        TypeError / ValueError naming the argument."""
        where = "QuantLinear.from_awq"
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise TypeError(f"{where}: argument 'group_size' must be an int or None (taken from the shapes), got "
                            f"{type(group_size).__name__} ({group_size!r})")
        try:  # every packed tensor's type, dtype, shape and device, before anything is built
            qw, s, z, gs = F.from_awq_tensors(qweight, qzeros, scales, group_size)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        n, k = qw.shape[0], qw.shape[1] * 2
        _check_import_bias(where, bias, n, qweight.device)
        m = cls(k, n, bias is not None, bits=4, group_size=gs, device=qweight.device,
                dtype=bias.dtype if bias is not None else None)
        m.qweight.copy_(qw)
        m.scales.copy_(s)
        m.zeros.copy_(z)
        if bias is not None:
            m.bias.copy_(bias)
        m.weight_dtype = scales.dtype
        return m
