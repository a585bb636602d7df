"""Drop-in modules built on thrifty ops."""
from thrifty.nn.norm import RMSNorm
from thrifty.nn.activation import SwiGLU

from thrifty.nn import functional

from thrifty.nn.quant import QuantLinear

__all__ = ["RMSNorm", "SwiGLU", "functional", "QuantLinear"]
