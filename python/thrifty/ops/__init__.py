"""Typed wrappers over torch.ops.thrifty, with fake (meta) and autograd registrations."""
from thrifty.ops.norm import rms_norm
from thrifty.ops.optim import multi_tensor_l2norm



__all__ = ["rms_norm", "rotary_embedding", "build_rotary_cache", "swiglu"]
