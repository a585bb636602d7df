"""Drop-in modules built on thrifty ops."""
from thrifty.nn.norm import RMSNorm

__all__ = ["RMSNorm"]
