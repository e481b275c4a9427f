"""HeadKV: per-head budgets from offline head-importance scores; SnapKV picks the entries within a head.

Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval and
Reasoning", ICLR 2025, https://arxiv.org/abs/2410.19258.

Budget rule (the paper / its KVCache-Factory port): with b entries per head beyond the observation
window, every head gets a base budget `b − ⌊b/β⌋` and the remaining `⌊b/β⌋` of every head go to a shared
pool that is split proportionally to the normalised importance scores (β = 1.01 by default, so almost
all of the budget is distributed by importance). Every head also keeps the SnapKV window. Here:
- `pool="layer"` (default): the pool is shared by the KV heads of one layer, so each layer keeps exactly
  H_kv × k entries (k = the uniform per-head count from `compression_ratio`/`budget`);
- `pool="global"`: the pool is shared by all compressible layers, as in the paper (scores normalised over
  all layers and heads), so layers keep different totals;
- shares are rounded by largest remainder (the paper rounds each head, so its total drifts), and a head
  never gets more than the row has; its surplus goes to the other heads by importance.
Without `scores_path` all heads are equally important, which is exactly uniform SnapKV.

Scores file: `.json` with `{"scores": [[...]]}` (what `kvforge headkv-scores` writes) or a bare nested
list, or HeadKV's own `{"<layer>-<head>": [values]}` (mean of the values); `.pt` with a tensor or such a
dict. Shape `[num_layers, num_kv_heads]`, or `[num_layers, num_attention_heads]`, which is averaged over
the query heads of each KV head. Scores must be >= 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvforge.errors import KVForgeError
from kvforge.presses.base import (
    LayerContext,
    Press,
    check_choice,
    check_float,
    descending_rank,
    keep_count,
    select_mask,
)
from kvforge.presses.registry import register
from kvforge.presses.snapkv import SnapKVPress

POOLS = ("layer", "global")


def load_head_scores(path: str) -> torch.Tensor:
    """Read head-importance scores `[num_layers, heads]` (float64) from a `.json` or `.pt` file."""
    p = Path(path)
    if not p.is_file():
        raise KVForgeError(f"headkv: scores_path {path!r} does not exist; run `kvforge headkv-scores` to make one")
    try:
        if p.suffix == ".pt":
            data = torch.load(p, map_location="cpu", weights_only=True)
        else:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
    except (OSError, ValueError, RuntimeError) as e:
        raise KVForgeError(f"headkv: cannot read scores_path {path!r}: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and "scores" in data:
        data = data["scores"]
    if isinstance(data, dict):  # HeadKV's {"layer-head": [scores...]}
        try:
            cells = {tuple(int(x) for x in key.split("-")): torch.tensor(v, dtype=torch.float64).mean().item()
                     for key, v in data.items()}
        except (ValueError, TypeError):
            raise KVForgeError(f"headkv: {path!r} is not a scores file ('scores' list or 'layer-head' keys)") from None
        layers, heads = max(k[0] for k in cells) + 1, max(k[1] for k in cells) + 1
        scores = torch.zeros(layers, heads, dtype=torch.float64)
        for (layer, head), v in cells.items():
            scores[layer, head] = v
        data = scores
    try:
        scores = torch.as_tensor(data, dtype=torch.float64)
    except (ValueError, TypeError):
        raise KVForgeError(f"headkv: {path!r} does not hold a [num_layers, num_heads] table of numbers") from None
    if scores.dim() != 2 or scores.numel() == 0:
        raise KVForgeError(f"headkv: {path!r} holds shape {list(scores.shape)}; expected [num_layers, num_heads]")
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise KVForgeError(f"headkv: {path!r} has negative or non-finite scores; expected scores >= 0")
    return scores


def largest_remainder(shares: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Integers `[..., H]` with the given row sums `total [...]`, as close as possible to `shares [..., H]`
    (which sum to `total`): floor, then +1 for the largest fractional parts (ties: lower head first)."""
    base = shares.floor()
    short = (total.double() - base.sum(-1)).round().long()  # [...]
    rank = descending_rank(shares - base)
    return base.long() + (rank < short[..., None]).long()


def fill_to_capacity(counts: torch.Tensor, cap: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Clip `counts [B, H]` to `cap [B]` and hand the surplus to heads with room, most important first."""
    counts = counts.clone()
    for b in range(counts.shape[0]):
        c, limit = counts[b], int(cap[b])
        surplus = int((c - limit).clamp(min=0).sum())
        c.clamp_(max=limit)
        for head in importance.argsort(descending=True, stable=True).tolist():
            if surplus == 0:
                break
            give = min(surplus, limit - int(c[head]))
            c[head] += give
            surplus -= give
    return counts


@register("headkv")
@dataclass
class HeadKVPress(Press):
    """Per-head keep counts `[B, H_kv]` from importance scores `[num_layers, H_kv]`, then each head keeps its
    top entries by SnapKV's score `[B, H_kv, n]` (window `window_size`, pooling `pooling`/`kernel_size`);
    stored in a head-varlen layer. `beta`: the shared pool is ⌊b/β⌋ of every head's budget b."""

    kind = "prefill"
    frees_memory = "yes (packed per head on CUDA; padded to the longest head on CPU)"
    paper = "https://arxiv.org/abs/2410.19258"
    scores_path: str | None = None
    beta: float = 1.01
    pool: str = "layer"
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    def __post_init__(self):
        super().__post_init__()
        check_float(self, "beta", self.beta, low=1)
        check_choice(self, "pool", self.pool, POOLS)
        self._snapkv = SnapKVPress(window_size=self.window_size, kernel_size=self.kernel_size, pooling=self.pooling)
        self._scores = None if self.scores_path is None else load_head_scores(str(self.scores_path))

    def importance(self, ctx: LayerContext) -> torch.Tensor:
        """Importance of the KV heads of every model layer `[num_layers, H_kv]` (float64, uniform without a file)."""
        h = ctx.keys.shape[1]
        layers = len(ctx.cache.layers)
        if self._scores is None:
            return torch.ones(layers, h, dtype=torch.float64)
        s = self._scores
        if s.shape[0] != layers or s.shape[1] % h != 0:
            raise KVForgeError(
                f"headkv: scores in {self.scores_path!r} have shape {list(s.shape)}; this model needs "
                f"[{layers}, {h}] (KV heads) or [{layers}, {h} × groups] (query heads)"
            )
        return s.reshape(layers, h, s.shape[1] // h).mean(-1)

    def head_counts(self, ctx: LayerContext, k: torch.Tensor) -> torch.Tensor:
        """Entries each KV head of this layer keeps `[B, H_kv]`, for a uniform per-head count `k [B]`."""
        h = ctx.keys.shape[1]
        q, n = ctx.query.shape[2], ctx.keys.shape[2]
        imp = self.importance(ctx)
        window = k.clamp(max=min(self.window_size, q, n))  # [B] always kept by every head
        extra = k - window  # [B] per-head budget beyond the window
        shared = (extra.double() / self.beta).floor()  # [B] per head into the pool
        floor = (extra - shared.long())[:, None].expand(-1, h)  # [B, H]
        if self.pool == "layer":
            weights = imp[ctx.layer_idx]
            weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1.0 / h)
            alloc = largest_remainder(weights[None].to(k.device) * (shared * h)[:, None], shared * h)
        else:
            layers = ctx.cache.compressible_layers()
            table = imp[layers]  # [Lc, H]
            total = table.sum()
            table = table / total if total > 0 else torch.full_like(table, 1.0 / table.numel())
            pool = shared * h * len(layers)  # [B]
            flat = largest_remainder(table.reshape(1, -1).to(k.device) * pool[:, None], pool)  # [B, Lc*H]
            alloc = flat.reshape(-1, len(layers), h)[:, layers.index(ctx.layer_idx)]
        counts = window[:, None] + floor + alloc
        return fill_to_capacity(counts, ctx.n_real, imp[ctx.layer_idx])

    def compress(self, ctx: LayerContext) -> None:
        k = keep_count(ctx.n_real, self.compression_ratio, self.budget)  # [B] per head
        if bool((k >= ctx.n_real).all()):
            return
        counts = self.head_counts(ctx, k)  # [B, H]
        scores = self._snapkv.score(ctx).float().masked_fill(~ctx.real, float("-inf"))
        keep = descending_rank(scores) < counts[..., None]
        select_mask(ctx, keep)
