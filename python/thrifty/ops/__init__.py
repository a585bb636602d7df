"""Typed wrappers over torch.ops.thrifty, with fake (meta) and autograd registrations."""
from thrifty.ops.norm import rms_norm
from thrifty.ops.quant import dequantize, int8_linear, quant_linear, quantize_per_token



__all__ = ["rms_norm", "rotary_embedding", "build_rotary_cache", "swiglu", "quant_linear", "quantize_per_token", "int8_linear", "dequantize"]
