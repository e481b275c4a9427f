"""Presses: one file per method, registered by name. Importing this package registers them all."""

from kvforge.presses import adakv, knorm, pyramidkv, random, snapkv, streamingllm  # noqa: F401
from kvforge.presses.base import LayerContext, Press, ScorerPress
from kvforge.presses.registry import get_press, list_presses, press_table, register

__all__ = ["LayerContext", "Press", "ScorerPress", "get_press", "list_presses", "press_table", "register"]
