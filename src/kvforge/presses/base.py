"""Press base classes: what a compression method implements, and what the engine gives it.

A press runs inside the `kvforge` attention function, once per compressible layer, right after the
layer's attention over the full prefill was computed (so the prefill output is exact, as in kvpress).
It decides which entries the layer keeps and tells the layer (`keep`, `keep_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from kvforge.attention.context import LayerContext
from kvforge.cache.bits import mask_positions, row_cumsum
from kvforge.cache.coded import CodedLayer
from kvforge.errors import KVForgeError
from kvforge.kernels.quantize import check_bits, coded_count

GQA_AGGREGATIONS = ("mean", "max", "sum")


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
    buf = ctx.layer.storage
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


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool `[..., n]`: the `k` highest scores of each row along the last axis, ties broken by position (earlier
    first); NaN counts as +inf. Exactly `descending_rank(scores) < k` (the sort is the slow twin), without a sort:
    the k-th largest score from an unsorted top-k, every entry above it, and the first tied ones by position."""
    n = scores.shape[-1]
    if k <= 0 or k >= n:
        return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
    s = scores.float().nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    threshold = s.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = s > threshold
    tied = s == threshold
    return above | (tied & (row_cumsum(tied) <= k - above.sum(-1, keepdim=True)))


def plain_keep_count(press: Press, ctx: LayerContext) -> int | None:
    """Entries to keep per row and head in a plain prefill (no padding, no chunks: every row holds the n entries it
    saw), computed on the host with `keep_count`'s arithmetic in Python's doubles; None otherwise (the device path)."""
    if not ctx.all_real or getattr(ctx.cache, "chunk_size", None) is not None:
        return None
    n = ctx.keys.shape[2]
    return min(n, press.budget) if press.budget is not None else int(n * (1.0 - press.compression_ratio))


def keep_top(ctx: LayerContext, scores: torch.Tensor, k: int) -> None:
    """Keep the `k` highest-scoring entries of every head (ties: the earlier first), in position order; every row
    holds all its entries (`ctx.all_real`)."""
    ctx.layer.keep(mask_positions(top_mask(scores, k), k), increasing=True)


def select_topk(ctx: LayerContext, scores: torch.Tensor, k: torch.Tensor) -> None:
    """Keep the `k[b]` highest-scoring real entries of every head of row b (same count for all heads).

    Rows keeping fewer than the batch maximum are filled with padding entries, which their mask hides,
    so each row keeps exactly what it would keep alone. A row without enough padding left to fill with (a prefill
    compressed chunk by chunk already evicted it) makes the layer per-head instead (`select_mask`).
    """
    kmax = int(k.max())
    if ctx.all_real and bool((k == kmax).all()):  # no padding, one count (a plain prefill): the entries of rank <
        # kmax, found without a sort (a sort of 128k scores per head cost milliseconds per layer on an H100)
        keep_top(ctx, scores, kmax)
        return
    real = ctx.real
    rank = descending_rank(scores.float().masked_fill(~real, float("-inf")))
    selected = (rank < k[:, None, None]) & real
    if bool(((~real).sum(-1) < (kmax - k)[:, None]).any()):
        select_mask(ctx, selected)
        return
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

    The engine calls every press's hooks (`after_prefill`, `on_decode`, `select`; the defaults do nothing) and
    reads its flags (`acts_while_decoding`, `has_extra_pass`) where it must choose a path; never probe for hooks.
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
            check_float(self, "compression_ratio", self.compression_ratio, 0, 1, high_open=True)
            self.compression_ratio = float(self.compression_ratio)
        check_int(self, "budget", self.budget, minimum=1, optional=True, hint="entries kept per layer and head")

    def compress(self, ctx: LayerContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def chunk_refusal(self) -> str | None:
        """Why this press cannot compress a prefill chunk by chunk (`KVCache(chunk_size=...)`), or None when it can.
        Under chunking, `compress` runs after every chunk's attention over the layer's kept + new entries, with the
        chunk's queries, and keeps the ratio of the real tokens seen so far (`LayerContext.n_seen`)."""
        return "only scorer presses (and adakv over one) re-select over kept + new entries chunk by chunk"

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- hooks: the engine calls them on every press; the defaults do nothing -----------------------------------
    def after_prefill(self, model, cache, enc) -> None:
        """Once per prefill, after every layer's `compress` ran and the cache disarmed: extra passes over the
        context (KVzip). `cache` is the `KVCache`, `enc` the `Encoded` prompts (`ctx_ids`, `ctx_mask` `[B, n]`).
        Default: nothing."""

    def on_decode(self, ctx: LayerContext) -> None:
        """After attention on every forward that follows the prefill (decoded tokens `q = 1`, questions `q > 1`):
        `ctx.query [B, Hq, q, D]`, `ctx.keys` / `ctx.values [B, H_kv, n, D]` with the q new entries last. May
        evict (H2O, TOVA, Scissorhands, DecodingPress). Default: nothing."""

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        """Before attention on a one-token decoding step (`ctx.query [B, Hq, 1, D]`): bool `[B, H_kv, n]`, the
        stored entries to attend (nothing is evicted; Quest), or None for all of them. Default: None."""
        return None

    # -- flags the engine reads to choose a path ------------------------------------------------------------------
    @property
    def acts_while_decoding(self) -> bool:
        """True when `on_decode` or `select` does something: the press must see every decoding forward, so
        graph decoding, the fused coded kernel and batched forks are off."""
        return overrides(self, "on_decode") or overrides(self, "select")

    @property
    def has_extra_pass(self) -> bool:
        """True when `after_prefill` does something (extra passes over the context, needing the model and
        the prompts): query-aware answering is off."""
        return overrides(self, "after_prefill")


def overrides(press: Press, hook: str) -> bool:
    """True when `press`'s class replaces the base `Press` hook `hook` (the base's are no-ops)."""
    return getattr(type(press), hook) is not getattr(Press, hook)


# -- validation of options: one-line `KVForgeError`s naming the press, the option, the value and what is allowed --
def _reject(press: Press, field: str, value, allowed: str, hint: str) -> None:
    note = f" ({hint})" if hint else ""
    raise KVForgeError(f"{press.name}: {field}={value!r}; allowed: {allowed}{note}")


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_int(press: Press, field: str, value, minimum: int = 1, maximum: int | None = None, *,
              optional: bool = False, hint: str = "") -> None:
    """`value` must be an integer (not a bool) in `[minimum, maximum]` (`maximum` None = unbounded); None too when
    `optional`. `hint` is added to the message in parentheses."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        none = "None or " if optional else ""
        _reject(press, field, value, f"{none}an integer {_bounds(minimum, maximum, False, False)}", hint)


def check_float(press: Press, field: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, optional: bool = False, hint: str = "") -> None:
    """`value` must be a number (not a bool) between `low` and `high` (None = unbounded; an end is excluded when
    `low_open` / `high_open`); None too when `optional`. `hint` is added to the message in parentheses."""
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        none = "None or " if optional else ""
        _reject(press, field, value, f"{none}a number {_bounds(low, high, low_open, high_open)}", hint)


def check_choice(press: Press, field: str, value, allowed) -> None:
    """`value` must be one of `allowed`."""
    if value not in allowed:
        _reject(press, field, value, ", ".join(map(str, allowed)), "")


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
        check_choice(self, "gqa_aggregation", self.gqa_aggregation, GQA_AGGREGATIONS)

    def score(self, ctx: LayerContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def chunk_refusal(self) -> str | None:
        return None

    def keep_per_row(self, ctx: LayerContext) -> torch.Tensor:
        """Entries to keep per row `[B]`: the ratio (or budget) of the real tokens seen, at most those stored."""
        return torch.minimum(keep_count(ctx.n_seen, self.compression_ratio, self.budget), ctx.n_real)

    def host_keep_count(self, ctx: LayerContext) -> int | None:
        """`keep_per_row` computed on the host when every row holds the same entries (a plain prefill), else None.
        A press that overrides `keep_per_row` overrides this too (PyramidKV: None, its device counts)."""
        return plain_keep_count(self, ctx)

    def compress(self, ctx: LayerContext) -> None:
        # a plain prefill counts on the host: no device value is read back before the selection
        k = self.host_keep_count(ctx)
        if k is not None:
            if k < ctx.keys.shape[2]:
                keep_top(ctx, cached_score(self, ctx), k)
            return
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
        check_bits(self.name, self.bits, self.group_size, self.residual_length)

    def codec(self, ctx: LayerContext, keys: torch.Tensor, values: torch.Tensor):  # pragma: no cover - abstract
        """Code `keys`/`values` `[B, H_kv, m, D]` (m a multiple of group_size, or everything for head-varlen)."""
        raise NotImplementedError

    def compress(self, ctx: LayerContext) -> None:
        def build(keys, values, slots, valid):
            n = keys.shape[2]
            m = n if valid is not None else coded_count(n, self.group_size, self.residual_length)
            if valid is not None and n % self.group_size:
                raise KVForgeError(f"{self.name}: a head-varlen layer of {n} entries cannot be coded in groups of "
                                   f"{self.group_size}; use group_size dividing it or a uniform eviction press")
            return self.codec(ctx, keys[:, :, :m], values[:, :, :m]), m

        ctx.cache.layers[ctx.layer_idx] = CodedLayer.from_layer(ctx.layer, build)
