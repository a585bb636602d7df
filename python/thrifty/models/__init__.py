"""Llama-family models on thrifty ops, with Hugging Face checkpoints in and out."""
from thrifty.models.config import PRESETS, ConfigError, LlamaConfig
from thrifty.models.attention import AttnMeta, KVCache, RaggedKVCache, attend
from thrifty.models.llama import Llama, sample

__all__ = ["LlamaConfig", "Llama", "PRESETS", "ConfigError", "KVCache", "RaggedKVCache", "AttnMeta", "attend", "sample"]
