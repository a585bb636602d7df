"""Typed wrappers over torch.ops.thrifty, with fake (meta) and autograd registrations."""
from thrifty.ops.norm import rms_norm
from thrifty.ops.optim import multi_tensor_l2norm
from thrifty.ops.rotary import build_rotary_cache, rotary_embedding
from thrifty.ops.activation import swiglu
from thrifty.ops.attention import flash_attention, flash_attention_varlen
from thrifty.ops.loss import linear_cross_entropy

from thrifty.ops.linear import linear
from thrifty.ops.quant import dequantize, int8_linear, quant_linear, quantize_per_token



__all__ = ["rms_norm", "multi_tensor_l2norm", "build_rotary_cache", "rotary_embedding", "swiglu", "flash_attention", "flash_attention_varlen", "linear_cross_entropy", "linear", "dequantize", "int8_linear", "quant_linear", "quantize_per_token"]
