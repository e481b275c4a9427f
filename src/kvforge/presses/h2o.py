"""H2O: keep the heavy hitters (most attention received, accumulated over every query so far) and a recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023, https://arxiv.org/abs/2306.14048. Paper default: the budget split evenly between heavy hitters
and recent tokens (`heavy_ratio` 0.5). Decode-time: the cache never holds more than the budget after a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import GQA_AGGREGATIONS, LayerContext, Press, aggregate_groups, check_choice, check_float
from kvforge.presses.decoding import (
    PREFILL_CHUNK,
    attention_probs,
    evict,
    extend,
    get_state,
    host_budget,
    keep_top,
    keep_top_uniform,
    new_query_valid,
    recent_mask,
    row_budget,
    set_state,
    uniform,
)
from kvforge.presses.registry import register


def received_attention(ctx: LayerContext, how: str, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Attention each entry received from this forward's real queries, summed over the queries and aggregated
    over the query heads of each KV head (`how`), float32 `[B, H_kv, n]`. Queries in blocks of `chunk` rows
    (the prefill's full attention matrix is never held at once)."""
    q = ctx.query.shape[2]
    if q == 1 and ctx.all_real:  # a decoded token, a real query: its attention is the sum (x · 1 = x)
        return aggregate_groups(attention_probs(ctx, slice(0, 1))[:, :, :, 0], how)
    valid = new_query_valid(ctx).float()  # [B, q]: padding queries add nothing
    total = None
    for start in range(0, q, chunk):
        stop = min(q, start + chunk)
        probs = attention_probs(ctx, slice(start, stop))  # [B, H, G, r, n]
        part = aggregate_groups(torch.einsum("bhgrn,br->bhgn", probs, valid[:, start:stop]), how)
        total = part if total is None else total + part
    return total


@register("h2o")
@dataclass
class H2OPress(Press):
    """Per KV head, keep `heavy_ratio × budget` heavy hitters (highest accumulated attention `[B, H_kv, n]`)
    plus the rest of the budget as the most recent tokens.

    Prefill: scores = attention summed over every prompt query (causal), then the cache is cut to the budget
    (`budget`, or `(1 − compression_ratio) ×` the row's prefill length). Every later forward adds its queries'
    attention to the accumulators (kept per entry in `layer.press_state["acc"]`, gathered with the same indices
    as the entries) and evicts the lowest non-recent entries so that the row holds at most its budget.
    GQA: a KV head's score aggregates its query heads with `gqa_aggregation` (mean | max | sum).
    """

    kind = "decode"
    query_aware = True
    paper = "https://arxiv.org/abs/2306.14048"
    heavy_ratio: float = 0.5
    gqa_aggregation: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        check_float(self, "heavy_ratio", self.heavy_ratio, 0, 1)
        check_choice(self, "gqa_aggregation", self.gqa_aggregation, GQA_AGGREGATIONS)

    def _cut(self, ctx: LayerContext, acc: torch.Tensor, budget: torch.Tensor, budget_all: int | None = None) -> dict:
        """Evict down to the budget; `budget_all`: every row's budget, known on the host (`host_budget`): with every
        entry real, the decision needs no read."""
        if budget_all is not None and uniform(ctx):
            n = ctx.keys.shape[2]
            if n <= budget_all:
                return {"acc": acc}
            k = torch.full((ctx.keys.shape[0],), budget_all, device=ctx.keys.device)
            recent = k - (self.heavy_ratio * k.double()).long()
            keep = keep_top_uniform(acc, budget_all, protect=recent_mask(ctx, recent))
            return evict(ctx, keep, {"acc": acc}, width=budget_all)
        k = torch.minimum(ctx.n_real, budget)
        recent = k - (self.heavy_ratio * k.double()).long()
        keep = keep_top(acc, ctx.real, k, protect=recent_mask(ctx, recent), all_real=ctx.all_real)
        return evict(ctx, keep, {"acc": acc})

    def compress(self, ctx: LayerContext) -> None:
        acc = received_attention(ctx, self.gqa_aggregation)
        budget = row_budget(ctx.n_real, self.compression_ratio, self.budget)
        budget_all = host_budget(ctx, self.compression_ratio, self.budget)
        state = self._cut(ctx, acc, budget, budget_all)
        set_state(ctx, {"acc": state["acc"], "budget": budget, "budget_all": budget_all})

    def on_decode(self, ctx: LayerContext) -> None:
        state = get_state(ctx)
        n = ctx.keys.shape[2]
        if state is None:  # a cache that skipped the prefill compression: budget from what it held before
            before = ctx.n_real - new_query_valid(ctx).sum(-1)
            state = {"acc": ctx.keys.new_zeros(*ctx.keys.shape[:2], 0, dtype=torch.float32),
                     "budget": row_budget(before, self.compression_ratio, self.budget),
                     "budget_all": host_budget(ctx, self.compression_ratio, self.budget, n - ctx.query.shape[2])}
        acc = extend(state["acc"], n) + received_attention(ctx, self.gqa_aggregation)
        kept = self._cut(ctx, acc, state["budget"], state.get("budget_all"))
        set_state(ctx, {"acc": kept["acc"], "budget": state["budget"], "budget_all": state.get("budget_all")})
