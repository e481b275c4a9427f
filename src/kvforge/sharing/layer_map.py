"""The layer map of cross-layer KV sharing, in the reference's (whyNLP/LCKV) string syntax, and its presets.

`"0_20_20_…_20_21"`: `_`-separated entries, entry i = the layer whose KV layer i attends to; a trailing `s`
marks a sliding-window layer. A layer attending to a *higher* layer (an "upward" layer) sees only strictly
earlier tokens of it. A layer whose index appears in the map is a *producer*: it computes and stores KV; every
other layer stores nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvforge.errors import KVForgeError

_ENTRY = re.compile(r"^(\d+)(s?)$")
PRESETS = ("lckv", "cla", "yoco", "mixattention")


@dataclass(frozen=True)
class LayerMap:
    """`sources[i]`: the layer whose KV layer i reads; `sliding[i]`: layer i attends through a sliding window."""

    sources: tuple[int, ...]
    sliding: tuple[bool, ...]

    @classmethod
    def parse(cls, text: str, num_layers: int | None = None) -> LayerMap:
        """Parse and validate `text`; one-line KVForgeError on a malformed string or an impossible map."""
        if not isinstance(text, str) or not text:
            raise KVForgeError(f"layer map {text!r} is empty; expected entries like '0_2_2_3s' (layer i reads layer "
                               "entry i, a trailing s = sliding window)")
        sources, sliding = [], []
        for i, entry in enumerate(text.split("_")):
            m = _ENTRY.match(entry)
            if m is None:
                raise KVForgeError(f"malformed layer map entry {entry!r} at layer {i} of {text!r}; expected a layer "
                                   "index with an optional trailing s, e.g. '0_2_2_3s'")
            sources.append(int(m.group(1)))
            sliding.append(bool(m.group(2)))
        lm = cls(tuple(sources), tuple(sliding))
        lm.check(num_layers)
        return lm

    def check(self, num_layers: int | None = None) -> None:
        n = len(self.sources)
        if num_layers is not None and n != num_layers:
            raise KVForgeError(f"layer map {self} has {n} entries for a model of {num_layers} layers; give one "
                               "entry per layer")
        for i, j in enumerate(self.sources):
            if j >= n:
                raise KVForgeError(f"layer map {self}: layer {i} reads layer {j}, out of range 0..{n - 1}")
        for i, j in enumerate(self.sources):
            if self.sliding[j] and not self.sliding[i]:
                raise KVForgeError(f"layer map {self}: layer {j} is marked sliding (its cache keeps only the window) "
                                   f"but layer {i} reads it with full attention; mark {i} sliding too or drop the "
                                   f"s of {j}")

    def __str__(self) -> str:
        return "_".join(f"{j}{'s' if s else ''}" for j, s in zip(self.sources, self.sliding))

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def producers(self) -> list[int]:
        """Layers whose KV some layer reads (they compute and store it), ascending."""
        return sorted(set(self.sources))

    def upward(self, i: int) -> bool:
        """Layer i reads a higher layer: it sees only strictly earlier tokens of it."""
        return self.sources[i] > i

    @property
    def has_upward(self) -> bool:
        return any(self.upward(i) for i in range(len(self)))

    def consumers(self, j: int) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s == j]

    def segments(self) -> list[tuple[int, int, bool]]:
        """The iteration plan: consecutive layer ranges `(start, stop, cyclic)`. A cyclic range contains every layer
        some upward layer of it reads (the closure of its upward reads), so it is iterated on its own; the others run
        once. As the reference's `iteration_plan`."""
        out, i, n = [], 0, len(self)
        while i < n:
            if self.upward(i):
                top = self.sources[i]
                while top < max(self.sources[i : top + 1]):
                    top = max(self.sources[i : top + 1])
                out.append((i, top + 1, True))
                i = top + 1
            else:
                start = i
                while i < n and not self.upward(i):
                    i += 1
                out.append((start, i, False))
        return out


def preset(name: str, num_layers: int, warmup: int = 2) -> LayerMap:
    """The layer map of a named scheme for `num_layers` layers (one-line KVForgeError when it does not fit).

    - `lckv`: every layer reads the KV of the top non-warm-up layer, except `warmup` standard layers (half at the
      bottom, the rest at the top); 22 layers, warmup 2: `0_20_20_…_20_21` (the reference's TinyLlama config).
    - `cla`: pairs of layers read the lower layer's KV: `0_0_2_2_…` (needs an even layer count).
    - `yoco`: the lower half are sliding-window layers with their own KV, the upper half all read the first upper
      layer's KV: `0s_1s_…_10s_11_11_…_11` for 22 (needs an even layer count).
    - `mixattention` (MixAttention, pairs): blocks of six layers, one global layer then five sliding ones; the
      global layers of consecutive blocks share one KV, the sliding ones share in groups of two and three (one
      group in a shorter last block); 22 layers give the reference's `0_1s_1s_3s_3s_3s_0_7s_…_19s` (needs ≥ 6).
    """
    n = num_layers
    if name == "lckv":
        if warmup < 0 or n - warmup < 2:
            raise KVForgeError(f"preset lckv with {warmup} warm-up layers does not fit {n} layers; it needs at least "
                               f"warmup + 2 = {warmup + 2} layers")
        bottom = warmup // 2
        target = n - (warmup - bottom) - 1
        text = "_".join(str(i if i < bottom or i > target else target) for i in range(n))
    elif name == "cla":
        if n < 2 or n % 2:
            raise KVForgeError(f"preset cla (pairs of layers) does not fit {n} layers; it needs an even layer count")
        text = "_".join(str(i - i % 2) for i in range(n))
    elif name == "yoco":
        if n < 2 or n % 2:
            raise KVForgeError(f"preset yoco (lower half sliding, upper half one KV) does not fit {n} layers; it "
                               "needs an even layer count")
        half = n // 2
        text = "_".join(f"{i}s" if i < half else str(half) for i in range(n))
    elif name == "mixattention":
        if n < 6:
            raise KVForgeError(f"preset mixattention (blocks of 6 layers) does not fit {n} layers; it needs at "
                               "least 6")
        entries = []
        for i in range(n):
            block, k = i - i % 6, i % 6
            if k == 0:  # global layer: blocks pair up, the second of a pair reads the first's KV
                entries.append(str(block - 6 if (block // 6) % 2 else block))
            else:
                five = n - block >= 6
                first = block + (1 if not five or k < 3 else 3)
                entries.append(f"{first}s")
        text = "_".join(entries)
    else:
        raise KVForgeError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return LayerMap.parse(text, n)
