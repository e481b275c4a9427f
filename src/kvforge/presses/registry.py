"""The press registry: the single source of truth for the CLI, the README table and the test matrix."""

from __future__ import annotations

import dataclasses

from kvforge.errors import KVForgeError

PRESSES: dict[str, type] = {}


def register(name: str):
    """Class decorator: `@register("snapkv")` names a press dataclass and adds it to the registry."""

    def deco(cls):
        if name in PRESSES:
            raise ValueError(f"press {name!r} registered twice")
        cls.name = name
        PRESSES[name] = cls
        return cls

    return deco


def list_presses() -> list[str]:
    """Names of every registered press, sorted."""
    return sorted(PRESSES)


def get_press(name: str, **kwargs):
    """Build a registered press by name; unknown names or options raise a one-line `KVForgeError`."""
    if name not in PRESSES:
        raise KVForgeError(f"unknown press {name!r}; allowed: {', '.join(list_presses())}")
    cls = PRESSES[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in kwargs if k not in allowed]
    if bad:
        raise KVForgeError(f"press {name!r} has no option {bad[0]!r}; allowed: {', '.join(allowed)}")
    return cls(**kwargs)


def press_table() -> list[dict]:
    """One row per press: name, kind, query-aware, frees memory, extra passes, paper."""
    rows = []
    for name in list_presses():
        cls = PRESSES[name]
        rows.append(
            {
                "name": name,
                "kind": cls.kind,
                "query_aware": "yes" if cls.query_aware else "no",
                "frees_memory": cls.frees_memory,
                "extra_passes": cls.extra_passes,
                "paper": cls.paper,
            }
        )
    return rows
