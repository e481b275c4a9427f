"""AdaKV: head-adaptive budgets. One top-k across all heads of a layer, with a per-head floor.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", 2024, https://arxiv.org/abs/2407.11550. Default safeguard α = 0.2 (each head keeps at least
α × the uniform per-head budget). Heads keep different numbers of entries: the layer becomes head-varlen
and really stores only the kept entries (padded to the largest head on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.presses.base import (
    LayerContext,
    Press,
    cached_score,
    check_float,
    descending_rank,
    keep_count,
    plain_keep_count,
    select_mask,
    top_mask,
)
from kvforge.presses.registry import register, resolve_scorer


@register("adakv")
@dataclass
class AdaKVPress(Press):
    """Wraps a scorer press (`press`: a name or a `ScorerPress`; default snapkv).

    Per row: total = H_kv × k (k = uniform per-head keep count); every head first keeps its top
    `floor(α·k)` entries, then the best remaining entries across all heads fill the total.
    """

    kind = "wrapper"
    frees_memory = "yes (packed per head on CUDA; padded to the longest head on CPU)"
    paper = "https://arxiv.org/abs/2407.11550"
    press: object = field(default="snapkv")
    alpha_safeguard: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        self.press = resolve_scorer(self.name, self.press)
        check_float(self, "alpha_safeguard", self.alpha_safeguard, 0, 1)

    def chunk_refusal(self) -> str | None:
        return self.press.chunk_refusal()

    def compress(self, ctx: LayerContext) -> None:
        k = plain_keep_count(self, ctx)
        if k is not None:  # a plain prefill: counts on the host
            b, h, n = ctx.keys.shape[:3]
            if k >= n:
                return
            scores = cached_score(self.press, ctx).float()
            kept = torch.where(top_mask(scores, int(self.alpha_safeguard * k)), float("inf"), scores)
            select_mask(ctx, top_mask(kept.reshape(b, 1, h * n), k * h).reshape(b, h, n))
            return
        k = torch.minimum(keep_count(ctx.n_seen, self.compression_ratio, self.budget), ctx.n_real)  # [B] per head
        if bool((k >= ctx.n_real).all()):
            return
        scores = cached_score(self.press, ctx).float().masked_fill(~ctx.real, float("-inf"))
        b, h, n = scores.shape
        floor = (self.alpha_safeguard * k.double()).long()  # [B]
        if b == 1:  # one count per layer: sort-free selection (`top_mask`, whose twin is the rank below)
            kept = torch.where(top_mask(scores, int(floor[0])), float("inf"), scores)
            select_mask(ctx, top_mask(kept.reshape(1, 1, h * n), int(k[0]) * h).reshape(1, h, n))
            return
        head_rank = descending_rank(scores)
        scores = torch.where(head_rank < floor[:, None, None], torch.full_like(scores, float("inf")), scores)
        flat_rank = descending_rank(scores.reshape(b, 1, h * n)).reshape(b, h, n)
        keep = flat_rank < (k * h)[:, None, None]
        select_mask(ctx, keep)

