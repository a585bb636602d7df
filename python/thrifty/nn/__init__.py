"""Drop-in modules built on thrifty ops."""
from thrifty.nn.norm import RMSNorm
from thrifty.nn.quant import QuantLinear

__all__ = ["RMSNorm", "QuantLinear"]
