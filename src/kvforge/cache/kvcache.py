"""`KVCache`: a `transformers.Cache` whose layers kvforge controls, plus the binding to the attention function."""

from __future__ import annotations

import copy
import weakref
from contextvars import ContextVar
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvforge.cache.layers import DenseLayer, HeadVarlenLayer, PackedHeadLayer
from kvforge.cache.plan import build_layers, layer_plan
from kvforge.cache.window import WindowLayer
from kvforge.config import check_supported, enable_kvforge_attention, text_config
from kvforge.errors import KVForgeError, check_count

# The layer whose `update()` ran last in this thread/context, and the key tensor it returned. The attention
# function only trusts it when the key it receives *is* that tensor, so a binding can never leak into a
# later call that uses another cache (or none). Both are held by weak reference: nothing takes the binding
# when the model runs another attention (sdpa, with no press) or a forward stops between a layer's update and
# its attention (an out-of-memory error), and a strong reference here would keep that cache's memory alive
# after the caller dropped it.
_BOUND: ContextVar[tuple[weakref.ref, int, weakref.ref] | None] = ContextVar("kvforge_bound", default=None)


class _GraphStep:
    """The cache whose graph-mode decode step is running: `kvforge.cache.graphs.GraphDecoder` sets `cache` around its
    forward, and the attention function then finds each layer by `module.layer_idx` instead of the binding
    (a plain attribute, not a ContextVar, so `torch.compile` traces the step in one graph). Process-wide: one
    graph-mode forward runs at a time (decoders in several threads would need a lock)."""

    cache: KVCache | None = None


GRAPH_STEP = _GraphStep()


def take_binding(key: torch.Tensor) -> tuple[KVCache, int] | None:
    """Return (cache, layer_idx) if `key` is what a KVCache layer just returned; clear the binding."""
    bound = _BOUND.get()
    if bound is None:
        return None
    _BOUND.set(None)
    cache_ref, layer_idx, key_ref = bound
    cache = cache_ref()
    return (cache, layer_idx) if cache is not None and key_ref() is key else None


def check_press(press: Any) -> None:
    """A press must be a press object (`kvforge.get_press(...)`), not its name or anything else."""
    if not callable(getattr(press, "compress", None)):
        hint = f"kvforge.get_press({press!r})" if isinstance(press, str) else "kvforge.get_press(name, ...)"
        raise KVForgeError(f"press={press!r} is not a press object; build one with {hint}")


def check_chunking(press: Any, chunk_size: int | None) -> None:
    """`chunk_size` must be None or an integer >= 1, and `press` (None or a press) able to compress chunk by chunk
    (`Press.chunk_refusal`); else a one-line KVForgeError."""
    if chunk_size is None:
        return
    check_count(chunk_size, "chunk_size")
    refusal = None if press is None else press.chunk_refusal()
    if refusal:
        raise KVForgeError(f"{press.name} cannot compress a prefill chunk by chunk: {refusal}; prefill it without "
                           "chunk_size")


class KVCache(Cache):
    """A compressible KV cache usable as `past_key_values` in `model.generate` or a forward call.

    Full-attention layers are `DenseLayer`s (or `HeadVarlenLayer`s once a press gives heads different
    budgets); sliding-window layers are `WindowLayer`s (transformers' layer, appending in place; never compressed).
    When `press` is given, the
    cache is *armed*: the next forward compresses every full-attention layer right after its attention
    is computed (the prefill itself sees the full context), then the cache disarms itself.

    Args:
        model: the model (or its config) the cache is for.
        press: a `kvforge` press, or None for no compression.
        reserve: extra capacity preallocated after prefill and after each prune (tokens), so decoding
            appends without reallocating.
        packed: store per-head budgets truly packed (`PackedHeadLayer`, decoded by the Triton kernel) rather
            than as a padded block (`HeadVarlenLayer`). Default: packed on CUDA, padded on CPU.
        plan: the kind of each layer (names registered in `kvforge.cache.plan`); default `layer_plan(model)`.
        chunk_size: prefill the context `chunk_size` tokens at a time (`kvforge.generate.prefill` reads it): each
            chunk attends to the cache so far, and with a press every chunk is compressed right after its attention,
            so the prefill holds the kept entries plus one chunk (see `Press.chunk_refusal` for what a press does
            under chunking). While armed, a forward of more than `chunk_size` tokens is refused.

    With a press, the model's attention is switched to kvforge's (transformers' `set_attn_implementation`),
    whatever path the model came from; an unsupported family is refused with a one-line KVForgeError. A forward
    that runs while the cache is armed but does not go through kvforge's attention (the model was switched back,
    or only a config was given) is refused at the next forward instead of silently compressing nothing.
    """

    def __init__(self, model: Any, press: Any = None, reserve: int = 256, packed: bool | None = None,
                 plan: list[str] | None = None, chunk_size: int | None = None):
        if press is not None:
            check_press(press)
        check_chunking(press, chunk_size)
        if press is not None:
            if callable(getattr(model, "set_attn_implementation", None)):
                enable_kvforge_attention(model)  # a press acts inside kvforge's attention: switch it on (or refuse)
            else:
                check_supported(model)
        cfg = text_config(model)
        self.plan = layer_plan(cfg) if plan is None else list(plan)
        super().__init__(layers=build_layers(cfg, self.plan, reserve))
        self.config = cfg
        self.press = press
        self.armed = press is not None
        self.packed = packed
        self.chunk_size = chunk_size
        self._pending: set[int] = set(self.compressible_layers()) if self.armed else set()
        self._armed_at: dict[int, int] = {}  # layer -> its logical length when the cache was (re-)armed
        # layer -> (module, query, logical mask, scaling) of the last prefill, when recording (shared sweeps)
        self.recorded: dict | None = None
        # optional callable(LayerContext) run after every attention of a compressible layer (scoring passes)
        self.observer = None
        self.score_memo: dict | None = None
        # time in the press's `compress`, counted when `press_seconds` is set to a number (`kvforge bench`): on CUDA
        # by events on the stream (`press_events`, read by `press_time()`), so the prefill runs as it would untimed;
        # with `press_sync` (or on CPU) by the host clock with the device synchronised around each call
        self.press_seconds: float | None = None
        self.press_events: list = []
        self.press_sync = False

    def press_time(self) -> float:
        """Seconds counted in the press's `compress` (`press_seconds` plus the CUDA events' spans; synchronises).
        An event span is the stream's time from a call's first to its last kernel: the kernels, plus any time the
        device waited for the host inside the call (after a host read such as `nonzero`), which is what the call
        adds to a prefill; host work the device did not wait for is not in it."""
        total = self.press_seconds or 0.0
        if self.press_events:
            self.press_events[-1][1].synchronize()
            total += sum(a.elapsed_time(b) for a, b in self.press_events) / 1e3
        return total

    @classmethod
    def from_layers(cls, model: Any, layers: list, reserve: int = 256) -> KVCache:
        """A cache (no press) holding `layers`, one per model layer: layers built with `from_entries`, or transformers'
        own sliding-window layers (e.g. documents placed side by side by `kvforge.link`)."""
        cache = cls(model, reserve=reserve)
        if len(layers) != len(cache.layers):
            raise KVForgeError(f"{len(layers)} layers for a model of {len(cache.layers)}; give one per layer")
        cache.layers = list(layers)
        return cache

    def fork(self) -> KVCache:
        """A copy that can be compressed and decoded independently of this cache.

        Layers are copied shallowly: pruning allocates new buffers, and decoding only writes beyond the
        snapshot point, which `restore()` rewinds; sliding layers (`WindowLayer`) never overwrite what they handed out,
        and a shallow copy writes into buffers of its own.
        """
        new = copy.copy(self)
        for layer in self.layers:
            if isinstance(layer, DenseLayer):
                layer.release()  # the fork shares the buffers: neither may move entries inside them
        new.layers = [copy.copy(layer) for layer in self.layers]
        new.armed, new._pending, new.recorded, new.observer, new._armed_at = False, set(), None, None, {}
        new.score_memo = self.score_memo  # forks of one prefill share press scores (presses.base.cached_score)
        return new

    def arm(self) -> None:
        """Compress again after the next forward (the next prefill chunk); a no-op without a press."""
        if self.press is None:
            return
        self.armed = True
        self._pending = set(self.compressible_layers())
        self._armed_at = {i: self.layers[i].get_seq_length() for i in self._pending}

    def mark_compressed(self, layer_idx: int) -> None:
        """Called after the press ran on a layer; the cache disarms once every compressible layer is done."""
        self._pending.discard(layer_idx)
        if not self._pending:
            self.armed = False

    # -- the binding ---------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.armed and self.chunk_size is not None and key_states.shape[-2] > self.chunk_size:
            raise KVForgeError(f"a forward of {key_states.shape[-2]} tokens into a cache with chunk_size="
                               f"{self.chunk_size}; prefill with kvforge.generate.prefill, which feeds it in chunks")
        armed_at = self._armed_at.get(layer_idx, 0)
        if self.armed and layer_idx in self._pending and self.layers[layer_idx].get_seq_length() > armed_at:
            raise KVForgeError("the press did not run: the previous forward did not use kvforge's attention; build "
                               "the cache from the model, KVCache(model, press=...), which switches it on")
        keys, values = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        if GRAPH_STEP.cache is not self:
            _BOUND.set((weakref.ref(self), layer_idx, weakref.ref(keys)))
        return keys, values

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """transformers' mask sizing. In graph mode the host counters lag the device, so a layer reports the
        position of its last graph step (a constant, like a static cache's capacity: the traced step never
        changes); the one-token mask is skipped either way."""
        graph = getattr(self.layers[layer_idx], "graph", None)
        return graph["limit"] - 1 if graph is not None else super().get_query_offset(layer_idx)

    # -- what the engine asks of layers ----------------------------------------------------------------
    def compressible_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if getattr(layer, "compressible", False)]

    def keep_per_head(self, layer_idx: int, keep: torch.Tensor) -> DenseLayer:
        """Keep entries where `keep [B, H_kv, n]`; heads may keep different numbers. The layer becomes
        head-varlen: packed on CUDA (or with `packed=True`), a padded block with validity otherwise."""
        layer = self.layers[layer_idx]
        packed = self.packed if self.packed is not None else layer.device.type == "cuda"
        if packed:
            new = PackedHeadLayer.from_layer(layer, keep) if not isinstance(layer, PackedHeadLayer) else layer
            if new is layer:
                layer.keep_mask(keep)
            self.layers[layer_idx] = new
            return new
        layer = self.to_head_varlen(layer_idx)
        layer.keep_mask(keep)
        return layer

    def drop_positions(self, drop: torch.Tensor) -> None:
        """Remove the entries of logical positions where `drop [B, L]` is True (a batch's padding) from every
        layer: rows then hold different numbers of entries, i.e. head-varlen layers. New buffers, so `restore()`
        of an earlier snapshot brings the old layers back. Stock sliding-window layers cannot drop entries."""
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, DenseLayer):
                raise KVForgeError("entries cannot be dropped from transformers' sliding-window layers")
            _, _, slots, valid = layer.entries()
            b, h, n = slots.shape
            keep = ~drop.gather(1, slots.reshape(b, -1).clamp(0, drop.shape[1] - 1)).view(b, h, n) & valid
            if not bool(keep.all()):
                self.keep_per_head(i, keep)

    def to_head_varlen(self, layer_idx: int) -> HeadVarlenLayer:
        """Switch layer `layer_idx` to per-head storage (kept entries are carried over)."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, HeadVarlenLayer):
            layer = HeadVarlenLayer.from_dense(layer)
            self.layers[layer_idx] = layer
        return layer

    @staticmethod
    def stack(caches: list[KVCache]) -> KVCache:
        """One cache whose batch rows are the rows of `caches`, in order (same model, same context).

        Compressed layers of different sizes become one head-varlen layer, each row padded to the longest
        with invalid entries; stock sliding layers are concatenated. Used to answer the questions of many
        (press, ratio) forks of one prefill in a single batched generation.
        """
        out = caches[0].fork()
        out.press = None
        for i, layer in enumerate(out.layers):
            group = [c.layers[i] for c in caches]
            if not isinstance(layer, DenseLayer):
                new = copy.copy(layer)
                new.keys = torch.cat([g.keys for g in group])
                new.values = torch.cat([g.values for g in group])
                out.layers[i] = new
                continue
            parts = [g.entries() for g in group]
            n = max(p[0].shape[2] for p in parts)
            padded = [[torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[2])) if t.dim() == 4
                       else torch.nn.functional.pad(t, (0, n - t.shape[2])) for t in p] for p in parts]
            keys, values, slots, valid = (torch.cat([p[j] for p in padded]) for j in range(4))
            out.layers[i] = HeadVarlenLayer.from_entries(keys, values, slots, valid, logical=layer.logical,
                                                         reserve=layer.reserve)
        return out

    # -- several questions on one compressed context ---------------------------------------------------
    def snapshot(self) -> list:
        """A cheap record of every layer (the layer object and its state); `restore()` returns to it."""
        states = []
        for layer in self.layers:
            if isinstance(layer, DenseLayer):
                states.append((layer, layer.snapshot()))
            else:  # sliding layer: what it handed out is never overwritten, so references are a snapshot
                states.append((layer, (layer.keys, layer.values, layer.cumulative_length, layer.is_initialized)))
        return states

    def restore(self, states: list) -> None:
        for i, (layer, state) in enumerate(states):
            self.layers[i] = layer
            if isinstance(layer, DenseLayer):
                layer.restore(state)
            else:
                layer.keys, layer.values, layer.cumulative_length, layer.is_initialized = state

    # -- accounting ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """`entries`: per layer, stored entries (an int, or a list per KV head for head-varlen layers);
        `bytes`: bytes of stored keys and values; `allocated_bytes`: bytes the buffers occupy (capacity and
        the padding of head-varlen blocks included); `uncompressed_bytes`: what the same tokens take with
        nothing removed."""
        entries, stored, allocated, full = [], 0, 0, 0
        for layer in self.layers:
            if isinstance(layer, DenseLayer):
                entries.append(layer.entry_counts())
                stored += layer.stored_bytes()
                allocated += layer.allocated_bytes()
                full += layer.uncompressed_bytes()
            elif callable(getattr(layer, "stored_bytes", None)):  # a kind that counts its own storage (streaming)
                entries.append(0 if layer.keys is None or not layer.is_initialized else layer.keys.shape[-2])
                b = layer.stored_bytes()
                stored, allocated, full = stored + b, allocated + b, full + b
            else:
                n = 0 if layer.keys is None or not layer.is_initialized else layer.keys.shape[-2]
                entries.append(n)
                if n:
                    b = layer.keys.numel() * layer.keys.element_size()
                    b += layer.values.numel() * layer.values.element_size()
                    stored += b
                    allocated += layer.allocated_bytes() if isinstance(layer, WindowLayer) else b
                    full += b
        return {"entries": entries, "bytes": stored, "allocated_bytes": allocated, "uncompressed_bytes": full}
