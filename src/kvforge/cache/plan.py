"""The per-layer plan: which layer kind each layer of a model's cache is built as.

`layer_plan(config)` is the only place that decides it: transformers' `layer_types` (full, sliding, chunked
attention) unless the config carries its own `kvforge_layer_plan` (a list of kind names, one per layer), which
is how a model with other layer kinds (a layer reading another layer's KV, a sink + window layer) asks for
them. A new layer kind is one class plus one `register_layer_kind` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.cache_utils import CacheLayerMixin

from kvforge.cache.layers import DenseLayer
from kvforge.cache.window import WindowLayer
from kvforge.config import layer_types, text_config
from kvforge.errors import KVForgeError

# kind name -> factory(text config, layer index, reserve) -> an empty layer
LayerFactory = Callable[[Any, int, int], CacheLayerMixin]
LAYER_KINDS: dict[str, LayerFactory] = {}


def register_layer_kind(name: str, factory: LayerFactory) -> None:
    """Make `name` usable in a layer plan. Re-registering a name replaces its factory."""
    LAYER_KINDS[name] = factory


register_layer_kind("full_attention", lambda cfg, i, reserve: DenseLayer(reserve=reserve))
register_layer_kind("sliding_attention", lambda cfg, i, reserve: WindowLayer(cfg.sliding_window))
register_layer_kind("chunked_attention", lambda cfg, i, reserve: WindowLayer(cfg.attention_chunk_size))


def layer_plan(model_or_config: Any) -> list[str]:
    """The kind of each layer: the config's `kvforge_layer_plan` when it has one, else its `layer_types`."""
    cfg = text_config(model_or_config)
    plan = getattr(cfg, "kvforge_layer_plan", None)
    return list(plan) if plan else layer_types(cfg)


def build_layers(model_or_config: Any, plan: list[str] | None = None, reserve: int = 256) -> list[CacheLayerMixin]:
    """Empty layers for `plan` (default `layer_plan(config)`); unknown kinds or a wrong length are a one-line
    KVForgeError."""
    cfg = text_config(model_or_config)
    plan = layer_plan(cfg) if plan is None else list(plan)
    if len(plan) != cfg.num_hidden_layers:
        raise KVForgeError(f"layer plan of {len(plan)} entries for a model of {cfg.num_hidden_layers} layers; "
                           "give one kind per layer")
    unknown = sorted({k for k in plan if k not in LAYER_KINDS})
    if unknown:
        raise KVForgeError(f"unknown layer kind {unknown[0]!r} in the layer plan; allowed: {', '.join(LAYER_KINDS)}")
    return [LAYER_KINDS[kind](cfg, i, reserve) for i, kind in enumerate(plan)]
