"""Typed wrappers over torch.ops.thrifty, with fake (meta) and autograd registrations."""
from thrifty.ops.norm import rms_norm
from thrifty.ops.optim import multi_tensor_l2norm
from thrifty.ops.rotary import build_rotary_cache, rotary_embedding
from thrifty.ops.activation import swiglu
from thrifty.ops.attention import flash_attention, flash_attention_varlen
from thrifty.ops.loss import linear_cross_entropy



__all__ = ["rms_norm", "rotary_embedding", "build_rotary_cache", "swiglu", "flash_attention", "flash_attention_varlen",
           "linear_cross_entropy"]
