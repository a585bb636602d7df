"""Drop-in modules built on thrifty ops."""
from thrifty.nn.norm import RMSNorm
from thrifty.nn.activation import SwiGLU

__all__ = ["RMSNorm", "SwiGLU"]
