"""TOVA, decode-time: at every step, evict the entry the newest query attends to least (averaged over heads).

Oren et al., "Transformers are Multi-State RNNs", 2024, https://arxiv.org/abs/2401.06104. The policy has one
parameter, the budget (the number of states kept). Scores are averaged over every query head of the layer,
so all heads drop the same token and the layer stays dense (the paper found head-averaging better than
per-head eviction). The prefill one-shot form is the `tova` press.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, Press
from kvforge.presses.decoding import (
    attention_probs,
    evict,
    get_state,
    host_budget,
    keep_top,
    keep_top_uniform,
    new_query_valid,
    row_budget,
    set_state,
    uniform,
)
from kvforge.presses.registry import register


def newest_query_scores(ctx: LayerContext) -> torch.Tensor:
    """Attention of the newest query `ctx.query[:, :, -1]` to each entry, averaged over all query heads of the
    layer, expanded to every KV head: float32 `[B, H_kv, n]` (the same scores for every head)."""
    q = ctx.query.shape[2]
    probs = attention_probs(ctx, slice(q - 1, q))[:, :, :, 0]  # [B, H, G, n]
    b, h, _, n = probs.shape
    return probs.mean(dim=(1, 2))[:, None].expand(b, h, n)


@register("tova_decode")
@dataclass
class TOVADecodePress(Press):
    """Keep at most the budget per row (`budget`, or `(1 − compression_ratio) ×` the prefill length): whenever
    a forward brings the cache above it, drop the entries with the lowest head-averaged attention
    `[B, n]` from the newest query — one per decoded token. The prefill is cut to the budget the same way,
    with the last prompt query. A multi-token forward (a question) is scored by its last query only (the
    paper adds prompt tokens one at a time; the scores of its earlier queries saw entries it would already
    have dropped). Any entry may go, the newest included, as in the paper.
    """

    kind = "decode"
    query_aware = True
    paper = "https://arxiv.org/abs/2401.06104"

    def _cut(self, ctx: LayerContext, budget: torch.Tensor, budget_all: int | None = None) -> None:
        """Cut the rows above their budget (at or below it, `keep_top` keeps every entry and `evict` changes nothing,
        found by its one host read). `budget_all`: every row's budget, known on the host (`host_budget`): with every
        entry real, the decision needs no read."""
        if budget_all is not None and uniform(ctx):
            n = ctx.keys.shape[2]
            if n > budget_all:
                evict(ctx, keep_top_uniform(newest_query_scores(ctx), budget_all), width=budget_all)
            return
        k = torch.minimum(ctx.n_real, budget)
        evict(ctx, keep_top(newest_query_scores(ctx), ctx.real, k, all_real=ctx.all_real))

    def compress(self, ctx: LayerContext) -> None:
        budget = row_budget(ctx.n_real, self.compression_ratio, self.budget)
        budget_all = host_budget(ctx, self.compression_ratio, self.budget)
        self._cut(ctx, budget, budget_all)
        set_state(ctx, {"budget": budget, "budget_all": budget_all})

    def on_decode(self, ctx: LayerContext) -> None:
        state = get_state(ctx)
        if state is None:  # a cache that skipped the prefill compression: budget from what it held before
            before = ctx.n_real - new_query_valid(ctx).sum(-1)
            state = {"budget": row_budget(before, self.compression_ratio, self.budget),
                     "budget_all": host_budget(ctx, self.compression_ratio, self.budget,
                                               ctx.keys.shape[2] - ctx.query.shape[2])}
        self._cut(ctx, state["budget"], state.get("budget_all"))
        set_state(ctx, state)
