"""Typed wrappers over torch.ops.thrifty, with fake (meta) and autograd registrations."""
from thrifty.ops.norm import rms_norm
from thrifty.ops.attention import flash_attention, flash_attention_varlen



__all__ = ["rms_norm", "rotary_embedding", "build_rotary_cache", "swiglu", "flash_attention", "flash_attention_varlen"]
