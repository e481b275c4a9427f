"""KVCache and its layer kinds."""

from kvforge.cache.kvcache import KVCache
from kvforge.cache.layers import DenseLayer, HeadVarlenLayer

__all__ = ["DenseLayer", "HeadVarlenLayer", "KVCache"]
