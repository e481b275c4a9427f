"""kvforge: one engine for the KV cache of Hugging Face causal LMs."""

from kvforge import presses, sharing  # noqa: F401  (register every press; the shared-KV model with the Auto classes)
from kvforge.attention import register as _register_attention
from kvforge.cache import KVCache
from kvforge.config import VERSION
from kvforge.errors import KVForgeError
from kvforge.generate import generate
from kvforge.models import load_model
from kvforge.presses import Press, ScorerPress, get_press, list_presses

_register_attention()

__all__ = [
    "KVCache",
    "KVForgeError",
    "Press",
    "ScorerPress",
    "generate",
    "get_press",
    "list_presses",
    "load_model",
]
__version__ = VERSION
