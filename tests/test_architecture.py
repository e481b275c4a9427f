"""The package's shape: a one-way import graph (no cycle, lazy imports included) and no `_private` name imported
across modules. The layering itself is written down in docs/architecture.md."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def import_graph(src: pathlib.Path, package: str) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> modules of `package` it imports, anywhere in the file) and the `_private` names imported from
    another module, as "importer: from module import name" lines."""
    mods = {}
    for path in (src / package).rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)

    def owner(name: str) -> str:  # the module a dotted name lives in (a submodule, or the longest prefix)
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, (path, is_pkg) in mods.items():
        here = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names if a.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] != package:
                    continue
                targets = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else owner(base))
                    if a.name.startswith("_") and not a.name.startswith("__") and sub not in mods:
                        private.append(f"{mod}: from {base} import {a.name}")
            else:
                continue
            edges[mod].update(t for t in targets if t and t != mod)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_kvforge():
    edges, _ = import_graph(SRC, "kvforge")
    # a submodule importing the package root would close a cycle through kvforge/__init__.py
    roots = sorted(m for m, targets in edges.items() if "kvforge" in targets and m != "kvforge")
    assert roots == [], f"modules importing the kvforge package root: {roots}"
    assert cycles(edges) == []


# The layering (docs/architecture.md): a module may import only from its own rank or below. The package root
# (`kvforge/__init__.py`, the public API) sits above everything.
LAYERS = {
    "errors": 0,
    "config": 1, "rope": 1, "prompt": 1, "kernels": 1, "models": 1,
    "cache": 2,
    "attention": 3,
    "presses": 4,
    "generate": 5,
    "calibrate": 6, "eval": 6, "link": 6, "sharing": 6, "streaming": 6,
    "cli": 7,
}


def _rank(module: str) -> int:
    part = module.split(".")[1]
    assert part in LAYERS, f"kvforge.{part} has no place in the layering: add it to LAYERS and docs/architecture.md"
    return LAYERS[part]


def test_imports_point_down_the_layers():
    edges, _ = import_graph(SRC, "kvforge")
    upward = sorted(f"{m} -> {t}" for m, targets in edges.items() if m != "kvforge" for t in targets
                    if t != "kvforge" and _rank(t) > _rank(m))
    assert upward == []


def test_no_private_name_imported_across_modules():
    _, private = import_graph(SRC, "kvforge")
    assert private == []


def test_no_loose_top_level_modules():
    """Top-level modules are the bottom layers (errors, config, rope, prompt) and the entry points (models,
    generate, cli); everything else lives in the package it serves."""
    loose = sorted(p.stem for p in (SRC / "kvforge").glob("*.py") if p.stem != "__init__")
    assert loose == ["cli", "config", "errors", "generate", "models", "prompt", "rope"]


def _fake_package(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = tmp_path / "fakepkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    # a lazy import inside a function still counts
    ({"__init__.py": "", "a.py": "from fakepkg.b import x\n", "b.py": "def x():\n    from fakepkg import a\n"},
     [["fakepkg.a", "fakepkg.b"]]),
    # relative imports, three modules
    ({"__init__.py": "", "sub/__init__.py": "", "sub/a.py": "from . import b\n", "sub/b.py": "from ..c import y\n",
      "c.py": "import fakepkg.sub.a\ny = 1\n"},
     [["fakepkg.c", "fakepkg.sub.a", "fakepkg.sub.b"]]),
    # one way: no cycle
    ({"__init__.py": "", "a.py": "from fakepkg.b import x\n", "b.py": "x = 1\n"}, []),
])
def test_cycle_detector_finds_cycles(tmp_path, files, expected):
    edges, _ = import_graph(_fake_package(tmp_path, files), "fakepkg")
    assert cycles(edges) == expected


def test_private_import_detector(tmp_path):
    files = {"__init__.py": "", "a.py": "from fakepkg.b import _helper, public\nfrom fakepkg import _sub\n",
             "b.py": "def _helper(): pass\npublic = 1\n", "_sub.py": ""}
    _, private = import_graph(_fake_package(tmp_path, files), "fakepkg")
    assert private == ["fakepkg.a: from fakepkg.b import _helper"]


def private_member_uses(src: pathlib.Path, package: str) -> list[str]:
    """`obj._name` (or `getattr(obj, "_name")`) where `_name` is not defined in the same module: a private
    member used outside the class (module) that owns it. `self._x` / `cls._x` are always the owner's own."""
    out = []
    for path in sorted((src / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
        for node in ast.walk(tree):
            name, obj = None, None
            if isinstance(node, ast.Attribute):
                name, obj = node.attr, node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr",
                  "setattr", "hasattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str)):
                name, obj = node.args[1].value, node.args[0]
            if not name or not name.startswith("_") or name.startswith("__"):
                continue
            if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
                continue
            if isinstance(obj, ast.Call) and isinstance(obj.func, ast.Name) and obj.func.id == "super":
                continue
            if name not in own:
                out.append(f"{path.relative_to(src)}:{node.lineno}: {ast.unparse(node)}")
    return out


# transformers' own private members kvforge must read: the config's attention implementation (public setter,
# no public getter in transformers 5.23).
ALLOWED_FOREIGN = {"_attn_implementation"}


def test_no_private_member_used_outside_its_module():
    uses = [u for u in private_member_uses(SRC, "kvforge") if not any(a in u for a in ALLOWED_FOREIGN)]
    assert uses == []


def test_private_member_detector(tmp_path):
    files = {"__init__.py": "",
             "a.py": "class A:\n    def __init__(self):\n        self._k = 1\n    def f(self, other):\n"
                     "        return other._k\n",
             "b.py": "def g(layer):\n    return layer._k, getattr(layer, '_v', None), layer.k\n"}
    uses = private_member_uses(_fake_package(tmp_path, files), "fakepkg")
    assert uses == ["fakepkg/b.py:2: layer._k", "fakepkg/b.py:2: getattr(layer, '_v', None)"]
