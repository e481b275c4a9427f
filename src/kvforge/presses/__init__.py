"""Presses: one file per method, registered by name. Importing this package imports (and so registers)
every module in it — a new method is one new file."""

import importlib
import pkgutil

from kvforge.presses.base import LayerContext, Press, ScorerPress
from kvforge.presses.registry import get_press, list_presses, press_table, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["LayerContext", "Press", "ScorerPress", "get_press", "list_presses", "press_table", "register"]
