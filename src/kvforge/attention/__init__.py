"""The registered `kvforge` attention function, its masks, backends and the context it hands presses."""

from kvforge.attention.context import LayerContext
from kvforge.attention.function import kvforge_attention, register, use_backend
from kvforge.attention.masks import entry_mask

__all__ = ["LayerContext", "entry_mask", "kvforge_attention", "register", "use_backend"]
