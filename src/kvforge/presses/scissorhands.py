"""Scissorhands: keep the tokens that were important persistently (often above average attention) lately.

Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache Compression at
Test Time", NeurIPS 2023, https://arxiv.org/abs/2305.17118. A fixed budget; when the cache is full, drop the
tokens that were least often "important" (attention above the average 1/t) within a history window of recent
queries, never the most recent tokens. The paper leaves the history window w, the recent window r and the
drop amount m as hyperparameters; our defaults (w = r = 32, m = 1) are choices, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, Press, check_int
from kvforge.presses.decoding import (
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

MAX_HISTORY = 62  # the window is a bitset in one int64 per entry and KV head


def important(ctx: LayerContext, rows: slice, probs: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, H_kv, r, n]` bool: entry received more than the average attention 1/t from query row j, t = the
    entries that query sees; the attention of a KV head is the mean over its query heads (`probs`, when the caller
    computed it: `attention_probs(ctx, rows).mean(2)`)."""
    probs = attention_probs(ctx, rows).mean(2) if probs is None else probs  # [B, H, r, n]
    start, stop, _ = rows.indices(ctx.query.shape[2])
    if start == ctx.query.shape[2] - 1 and ctx.all_real:  # the newest query sees every stored entry
        return probs * max(ctx.keys.shape[2], 1) > 1.0
    seen = ctx.mask(rows).sum(-1, keepdim=True).clamp(min=1)  # [B, 1 | H, r, 1]
    return probs * seen > 1.0


@register("scissorhands")
@dataclass
class ScissorhandsPress(Press):
    """Importance `[B, H_kv, n]` = how many of the last `history_window` queries gave the entry more than the
    average attention (1/t); kept per entry in `layer.press_state` as a bitset of those queries (shifted by
    one per real query) and its count, gathered with the same indices as the entries.

    Budget per row: `budget`, or `(1 − compression_ratio) ×` the prefill length. Whenever a forward brings a row
    above it, the row drops its least persistent entries down to `budget − drop_amount + 1` (one decoded token
    over the budget drops `drop_amount` entries; the paper drops in batches so that it compresses rarely), never
    the `recent_window` newest. Ties are broken by the newest query's attention. The prefill is cut the same
    way, with the window made of the last prompt queries.
    """

    kind = "decode"
    query_aware = True
    paper = "https://arxiv.org/abs/2305.17118"
    history_window: int = 32
    recent_window: int = 32
    drop_amount: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "history_window", self.history_window, minimum=1, maximum=MAX_HISTORY)
        check_int(self, "recent_window", self.recent_window, minimum=0)
        check_int(self, "drop_amount", self.drop_amount, minimum=1)
        if self.budget is not None and self.drop_amount > self.budget:
            raise KVForgeError(f"scissorhands: drop_amount={self.drop_amount} exceeds budget={self.budget}")

    def _observe(self, ctx: LayerContext, bits: torch.Tensor, count: torch.Tensor):
        """Shift this forward's real queries (the last `history_window` of them) into every entry's window. Returns
        the new bits and counts, and the newest query's head-mean attention `[B, H, n]` when it was the only row
        (a decoded token; `_cut` reuses it), else None."""
        q, w = ctx.query.shape[2], self.history_window
        rows = slice(max(0, q - w), q)
        probs = attention_probs(ctx, rows).mean(2)  # [B, H, r, n]
        hit = important(ctx, rows, probs).long()  # [B, H, r, n]
        valid = new_query_valid(ctx)[:, rows]  # [B, r]
        full = (1 << w) - 1
        for j in range(hit.shape[2]):
            oldest = (bits >> (w - 1)) & 1
            step = valid[:, j, None, None]
            bits = torch.where(step, ((bits << 1) | hit[:, :, j]) & full, bits)
            count = torch.where(step, count + hit[:, :, j] - oldest, count)
        return bits, count, (probs[:, :, 0] if q == 1 else None)

    def _cut(self, ctx: LayerContext, state: dict, newest: torch.Tensor | None = None) -> dict:
        """Cut the rows above their budget (a row at or below it keeps every entry: `evict` then changes nothing,
        found by its one host read). `newest`: the newest query's head-mean attention, when already computed."""
        budget_all = state.get("budget_all")
        width = None
        if budget_all is not None and uniform(ctx):  # every row's budget known on the host: no read decides
            if ctx.keys.shape[2] <= budget_all:
                return state
            width = max(budget_all - self.drop_amount + 1, 1)
            k = torch.full((ctx.keys.shape[0],), width, device=ctx.keys.device)
        else:
            n_real, budget = ctx.n_real, state["budget"]
            over = n_real > budget
            k = torch.where(over, (budget - self.drop_amount + 1).clamp(min=1), n_real)
        if newest is None:
            q = ctx.query.shape[2]
            newest = attention_probs(ctx, slice(q - 1, q))[:, :, :, 0].mean(2)  # [B, H, n], in [0, 1]
        scores = state["count"].float() + 0.5 * newest
        recent = torch.minimum(k, torch.full_like(k, self.recent_window))
        protect = recent_mask(ctx, recent)
        if width is not None:
            keep = keep_top_uniform(scores, width, protect)
        else:
            keep = keep_top(scores, ctx.real, k, protect=protect, all_real=ctx.all_real)
        kept = evict(ctx, keep, {"bits": state["bits"], "count": state["count"]}, width=width)
        return {**state, **kept}

    def compress(self, ctx: LayerContext) -> None:
        b, h, n = ctx.keys.shape[:3]
        zeros = torch.zeros(b, h, n, dtype=torch.long, device=ctx.keys.device)
        bits, count, newest = self._observe(ctx, zeros, zeros)
        budget = row_budget(ctx.n_real, self.compression_ratio, self.budget)
        budget_all = host_budget(ctx, self.compression_ratio, self.budget)
        set_state(ctx, self._cut(ctx, {"bits": bits, "count": count, "budget": budget, "budget_all": budget_all},
                                 newest))

    def on_decode(self, ctx: LayerContext) -> None:
        state = get_state(ctx)
        b, h, n = ctx.keys.shape[:3]
        if state is None:  # a cache that skipped the prefill compression: budget from what it held before
            before = ctx.n_real - new_query_valid(ctx).sum(-1)
            empty = torch.zeros(b, h, 0, dtype=torch.long, device=ctx.keys.device)
            state = {"bits": empty, "count": empty, "budget": row_budget(before, self.compression_ratio, self.budget),
                     "budget_all": host_budget(ctx, self.compression_ratio, self.budget, n - ctx.query.shape[2])}
        bits, count, newest = self._observe(ctx, extend(state["bits"], n), extend(state["count"], n))
        set_state(ctx, self._cut(ctx, {**state, "bits": bits, "count": count}, newest))
