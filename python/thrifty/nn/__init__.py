"""Drop-in modules built on thrifty ops."""
from thrifty.nn.norm import RMSNorm
from thrifty.nn.activation import SwiGLU
from thrifty.nn import functional

__all__ = ["RMSNorm", "SwiGLU", "functional"]
