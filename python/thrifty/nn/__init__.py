"""Drop-in modules built on thrifty ops."""
from thrifty.nn.norm import RMSNorm
from thrifty.nn import functional

__all__ = ["RMSNorm", "functional"]
