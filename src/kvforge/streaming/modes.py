"""The streaming modes: how a model keeps generating (or reading) past its cache size.

- `SW`: StreamingLLM — `n_sink` first tokens + the most recent ones, positions inside the cache (rotary keys
  re-rotated; absolute-position models just drop). Xiao et al. 2024, https://arxiv.org/abs/2309.17453.
- `Window`: the same without sinks — the known failure once the first tokens are evicted (the paper's baseline).
- `AR`: recompute the last `cache_size` tokens from scratch every step — the quality ceiling and the slow baseline
  ("sliding window with re-computation" in StreamingLLM, `ar` in KV-Align).
- `KV`: KV-Align — `SW`, then small networks rewrite every shifted window entry after each eviction.
  https://github.com/eecs585projectorg/kv-align.

`cache_size` counts every entry attention sees, the current token included. Defaults: 4 sinks (both
references) and StreamingLLM's 4 + 2000 entries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from kvforge.cache.kvcache import KVCache
from kvforge.config import text_config
from kvforge.errors import KVForgeError
from kvforge.streaming.kvalign import KVAlign
from kvforge.streaming.layer import check_entry_bits


def check_size(model: Any, cache_size: int, n_sink: int = 0) -> None:
    """One-line KVForgeError unless 0 ≤ n_sink < cache_size ≤ the model's positions."""
    if not isinstance(cache_size, int) or not isinstance(n_sink, int) or n_sink < 0:
        raise KVForgeError(f"cache size {cache_size!r} and sinks {n_sink!r}; allowed: integers, sinks ≥ 0")
    if cache_size <= n_sink:
        raise KVForgeError(f"cache size {cache_size} is not larger than the {n_sink} sinks; allowed: a cache size "
                           f"> {n_sink}")
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit and cache_size > limit:
        raise KVForgeError(f"cache size {cache_size} exceeds the model's {limit} positions; allowed: ≤ {limit}")


def streaming_cache(model: Any, cache_size: int, n_sink: int = 4, align: KVAlign | None = None,
                    bits: int = 16, alpha: float | None = None) -> KVCache:
    """A `KVCache` whose every layer is a `SinkWindowLayer` (plan kind `sink_window`) of `cache_size` entries with
    `n_sink` sinks, usable as `past_key_values` one token at a time (after a first forward of at most `cache_size`
    tokens). `align`: KV-Align networks applied to shifted window entries, at the strength calibrated for
    `cache_size` unless `alpha` is given. `bits` < 16: entries stored quantized
    (see `SinkWindowLayer`). The model is not modified."""
    check_size(model, cache_size, n_sink)
    check_entry_bits(bits)
    cfg = copy.copy(text_config(model))
    cfg.kvforge_streaming = {"n_sink": n_sink, "cache_size": cache_size, "bits": bits}
    cache = KVCache(cfg, plan=["sink_window"] * cfg.num_hidden_layers)
    if align is not None:
        align.check_model(model)
        for layer in cache.layers:
            layer.align = align.aligner(cache_size, alpha)
    return cache


@dataclass(frozen=True)
class SW:
    """StreamingLLM: sinks + window, positions inside the cache. `bits` 8/4/2 stores the entries quantized (16: as
    the model computed them)."""

    cache_size: int = 2004
    n_sink: int = 4
    bits: int = 16
    name = "sw"
    paper = "https://arxiv.org/abs/2309.17453"

    def check(self, model: Any) -> None:
        check_size(model, self.cache_size, self.n_sink)
        check_entry_bits(self.bits)

    def cache(self, model: Any) -> KVCache:
        return streaming_cache(model, self.cache_size, self.n_sink, bits=self.bits)


@dataclass(frozen=True)
class Window(SW):
    """Window attention: the most recent `cache_size` tokens, no sinks (positions inside the cache)."""

    n_sink: int = 0
    name = "window"


@dataclass(frozen=True)
class AR:
    """Sliding window with re-computation: every step is a plain forward over the last `cache_size` tokens."""

    cache_size: int = 2004
    name = "ar"
    paper = "https://arxiv.org/abs/2309.17453"

    def check(self, model: Any) -> None:
        check_size(model, self.cache_size)

    def cache(self, model: Any) -> None:
        return None


@dataclass(frozen=True)
class KV(SW):
    """KV-Align: `SW` plus networks that rewrite the shifted window entries after every eviction."""

    nets: KVAlign | None = field(default=None, compare=False)
    alpha: float | None = None  # strength of the correction; None: the one calibrated for cache_size
    name = "kv"
    paper = "https://github.com/eecs585projectorg/kv-align"

    def check(self, model: Any) -> None:
        super().check(model)
        if self.nets is None:
            raise KVForgeError("mode kv needs KV-Align networks; train them with `kvforge train kv-align` and pass "
                               "--kv-align DIR (KV(nets=KVAlign.load(DIR)))")
        self.nets.check_model(model)

    def cache(self, model: Any) -> KVCache:
        return streaming_cache(model, self.cache_size, self.n_sink, align=self.nets, bits=self.bits, alpha=self.alpha)


MODES = {"sw": SW, "window": Window, "ar": AR, "kv": KV}


def make_mode(name: str, cache_size: int, n_sink: int = 4, nets: KVAlign | None = None, bits: int = 16):
    """A mode by name (`sw`, `window`, `ar`, `kv`); one-line KVForgeError for anything else. `bits` < 16
    quantizes the cache of sw/window/kv (ar keeps no cache)."""
    if name not in MODES:
        raise KVForgeError(f"unknown streaming mode {name!r}; allowed: {', '.join(MODES)}")
    if name == "ar":
        return AR(cache_size)
    if name == "window":
        return Window(cache_size, bits=bits)
    if name == "kv":
        return KV(cache_size, n_sink, bits=bits, nets=nets)
    return SW(cache_size, n_sink, bits=bits)
