"""Press base classes: what a compression method implements, and what the engine gives it.

A press runs inside the `kvforge` attention function, once per compressible layer, right after the
layer's attention over the full prefill was computed (so the prefill output is exact, as in kvpress).
It decides which entries the layer keeps and tells the layer (`keep`, `keep_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import ClassVar

import torch

from kvforge.errors import KVForgeError

GQA_AGGREGATIONS = ("mean", "max", "sum")


class LayerContext:
    """Everything a press may read for one layer, computed lazily.

    Shapes: `query [B, Hq, q, D]` (this forward's queries), `keys [B, H_kv, n, D]`, `values [B, H_kv, n, Dv]`
    (every stored entry of the layer, the new ones included), `real [B, H_kv, n]` (entry is a real token,
    not padding or an invalid slot), `token_index [B, H_kv, n]` (position among the row's real tokens).
    """

    def __init__(self, module, cache, layer_idx: int, query: torch.Tensor, attention_mask, scaling: float | None):
        self.module = module
        self.cache = cache
        self.layer_idx = layer_idx
        self.layer = cache.layers[layer_idx]
        self.query = query
        self.attention_mask = attention_mask
        self.scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        compressible = cache.compressible_layers()
        self.rank = compressible.index(layer_idx)  # index among compressible layers
        self.num_layers = len(compressible)

    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.layer, "padded"):  # packed head-varlen: a padded view (entry_valid marks real ones)
            return self.layer.padded()
        return self.layer.keys, self.layer.values

    @property
    def keys(self) -> torch.Tensor:
        return self._kv()[0]

    @property
    def values(self) -> torch.Tensor:
        return self._kv()[1]

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]

    def mask(self, rows: slice | None = None) -> torch.Tensor:
        """Bool mask of (some of) this forward's queries over the stored entries, `[B, 1 | H_kv, r, n]`."""
        from kvforge.attention.function import entry_mask

        q = self.query.shape[2]
        m = entry_mask(self.attention_mask, self.layer, q, rows=rows if rows is not None else slice(0, q))
        return m

    @cached_property
    def real(self) -> torch.Tensor:
        b, h, n = self.keys.shape[:3]
        return self.mask(slice(-1, None))[:, :, 0].expand(b, h, n)

    @cached_property
    def n_real(self) -> torch.Tensor:
        """Real entries per row `[B]` (the most any head holds)."""
        return self.real.sum(-1).amax(-1)

    @cached_property
    def token_index(self) -> torch.Tensor:
        return self.real.long().cumsum(-1) - 1

    def window_attention(self, window: int) -> torch.Tensor:
        """Softmax attention of the last `window` queries over every entry, float32, `[B, H_kv, G, w, n]`."""
        b, hq, q, d = self.query.shape
        h = self.keys.shape[1]
        w = min(window, q)
        qw = self.query[:, :, q - w :].float().reshape(b, h, self.groups, w, d)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", qw, self.keys.float()) * self.scaling
        mask = self.mask(slice(q - w, q))  # [B, 1|H, w, n]
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def aggregate_groups(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Aggregate per-query-head scores `[B, H_kv, G, n]` to per-KV-head `[B, H_kv, n]`."""
    if how == "mean":
        return scores.mean(2)
    if how == "max":
        return scores.amax(2)
    return scores.sum(2)


def cached_score(press, ctx: LayerContext) -> torch.Tensor:
    """`press.score(ctx)`, memoized across the forks of one recorded prefill (`KVCache.score_memo`): scores
    do not depend on the ratio, so a sweep scores each layer once per press, not once per ratio. A hit needs
    the very same stored entries (the memo keeps the key buffer and compares identity)."""
    memo = getattr(ctx.cache, "score_memo", None)
    if memo is None:
        return press.score(ctx)
    opts = {k: v for k, v in press.options().items() if k not in ("compression_ratio", "budget")}
    key = (type(press).__name__, repr(opts), ctx.layer_idx)
    buf = getattr(ctx.layer, "_k", None)
    hit = memo.get(key)
    if hit is not None and hit[0] is buf and buf is not None:
        return hit[1]
    scores = press.score(ctx)
    memo[key] = (buf, scores)
    return scores


def keep_count(n: torch.Tensor, compression_ratio: float | None, budget: int | None) -> torch.Tensor:
    """Entries to keep per row from `n [B]` real entries (kvpress: `int(n * (1 - ratio))`)."""
    if budget is not None:
        return n.clamp(max=budget)
    return (n.double() * (1.0 - compression_ratio)).long()


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis (0 = highest score), ties broken by position."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def select_topk(ctx: LayerContext, scores: torch.Tensor, k: torch.Tensor) -> None:
    """Keep the `k[b]` highest-scoring real entries of every head of row b (same count for all heads).

    Rows keeping fewer than the batch maximum are filled with padding entries, which their mask hides,
    so each row keeps exactly what it would keep alone.
    """
    real = ctx.real
    rank = descending_rank(scores.float().masked_fill(~real, float("-inf")))
    selected = (rank < k[:, None, None]) & real
    kmax = int(k.max())
    priority = selected.to(torch.int8) * 2 + (~real).to(torch.int8)
    idx = priority.topk(kmax, dim=-1, sorted=False).indices.sort(-1).values
    ctx.layer.keep(idx)


def select_mask(ctx: LayerContext, keep: torch.Tensor) -> None:
    """Keep entries where `keep [B, H_kv, n]`; heads may keep different numbers (head-varlen layer)."""
    ctx.layer = ctx.cache.keep_per_head(ctx.layer_idx, keep & ctx.real)


@dataclass
class Press:
    """A KV-cache method. Subclasses are dataclasses registered with `@register("name")`.

    `compression_ratio`: fraction of context entries removed, in [0, 1) (kvpress convention).
    `budget`: entries kept per layer and head (KVCache-Factory's `max_capacity_prompt`). At most one of them.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "prefill"  # prefill | decode | wrapper | quantization | ...
    query_aware: ClassVar[bool] = False
    frees_memory: ClassVar[str] = "yes"
    extra_passes: ClassVar[str] = "0"
    paper: ClassVar[str] = ""
    ratio_free: ClassVar[bool] = False  # takes no compression_ratio (quantizers, layer merging): sweeps run it once

    compression_ratio: float | None = None
    budget: int | None = None

    def __post_init__(self):
        if self.compression_ratio is not None and self.budget is not None:
            raise KVForgeError(
                f"{self.name}: give compression_ratio ({self.compression_ratio}) or budget ({self.budget}), not both"
            )
        if self.compression_ratio is None and self.budget is None:
            self.compression_ratio = 0.0
        if self.compression_ratio is not None:
            r = self.compression_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise KVForgeError(f"{self.name}: compression_ratio={r!r} is outside the allowed range [0, 1)")
            self.compression_ratio = float(r)
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise KVForgeError(f"{self.name}: budget={self.budget!r} must be a positive integer (entries kept)")

    def compress(self, ctx: LayerContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ScorerPress(Press):
    """A press that scores entries; the base keeps the top-scoring ones, the same number per head.

    Subclasses implement `score(ctx) -> [B, H_kv, n]` (higher = keep). Scores computed per query head are
    aggregated per KV head with `gqa_aggregation` (mean | max | sum); the cache is never stored per
    query head.
    """

    gqa_aggregation: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        if self.gqa_aggregation not in GQA_AGGREGATIONS:
            raise KVForgeError(
                f"{self.name}: gqa_aggregation={self.gqa_aggregation!r}; allowed: {', '.join(GQA_AGGREGATIONS)}"
            )

    def score(self, ctx: LayerContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def keep_per_row(self, ctx: LayerContext) -> torch.Tensor:
        return keep_count(ctx.n_real, self.compression_ratio, self.budget)

    def compress(self, ctx: LayerContext) -> None:
        k = self.keep_per_row(ctx)
        if bool((k >= ctx.n_real).all()):
            return  # nothing to remove: leave the layer untouched (no-op ratio = plain generation)
        select_topk(ctx, cached_score(self, ctx), k)


@dataclass
class QuantizerPress(Press):
    """A press that quantizes what a layer holds instead of evicting (KIVI, GEAR, KVQuant).

    The layer becomes a `CodedLayer`: entries older than the newest `residual_length` are coded in whole
    groups of `group_size` tokens; the rest (and new tokens, until a group fills) stay in full precision.
    `compression_ratio` must stay 0: compose with an eviction press (`composed`) to evict as well."""

    kind = "quantization"
    ratio_free = True
    bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.budget is not None or self.compression_ratio:
            raise KVForgeError(f"{self.name} quantizes and evicts nothing: compression_ratio must be 0 and budget "
                               "unset; evict with another press first, e.g. composed(presses=[snapkv, "
                               f"{self.name}])")
        from kvforge.quant import check_bits

        check_bits(self.name, self.bits, self.group_size, self.residual_length)

    def codec(self, ctx: LayerContext, keys: torch.Tensor, values: torch.Tensor):  # pragma: no cover - abstract
        """Code `keys`/`values` `[B, H_kv, m, D]` (m a multiple of group_size, or everything for head-varlen)."""
        raise NotImplementedError

    def compress(self, ctx: LayerContext) -> None:
        from kvforge.cache.coded import CodedLayer
        from kvforge.quant import coded_count

        def build(keys, values, slots, valid):
            n = keys.shape[2]
            m = n if valid is not None else coded_count(n, self.group_size, self.residual_length)
            if valid is not None and n % self.group_size:
                raise KVForgeError(f"{self.name}: a head-varlen layer of {n} entries cannot be coded in groups of "
                                   f"{self.group_size}; use group_size dividing it or a uniform eviction press")
            return self.codec(ctx, keys[:, :, :m], values[:, :, :m]), m

        ctx.cache.layers[ctx.layer_idx] = CodedLayer.from_layer(ctx.layer, build)
