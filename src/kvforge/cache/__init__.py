"""KVCache, its layer kinds and the per-layer plan that decides them."""

from kvforge.cache.kvcache import KVCache
from kvforge.cache.layers import DenseLayer, HeadVarlenLayer, PackedHeadLayer
from kvforge.cache.plan import LAYER_KINDS, layer_plan, register_layer_kind
from kvforge.cache.window import WindowLayer

__all__ = ["LAYER_KINDS", "DenseLayer", "HeadVarlenLayer", "KVCache", "PackedHeadLayer", "WindowLayer", "layer_plan",
           "register_layer_kind"]
