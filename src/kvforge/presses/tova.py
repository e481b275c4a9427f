"""TOVA (prefill form): keep the entries the last token attends to most, averaged over heads.

Oren et al., "Transformers are Multi-State RNNs", 2024, https://arxiv.org/abs/2401.06104. TOVA evicts, at
every step, the entry with the lowest attention from the newest query, averaged over the heads of the
layer, so every head drops the same token (the paper found head-averaging better than per-head). This
file is the one-shot prefill form (as kvpress's `TOVAPress`): one top-k by the last prompt query's
attention. The newest token is always kept. The decode-time form lives elsewhere and reuses
`tova_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, ScorerPress, check_choice
from kvforge.presses.registry import register

HEAD_AVERAGES = ("layer", "group")


def tova_scores(ctx: LayerContext, heads: str = "layer", keep_last: bool = True) -> torch.Tensor:
    """TOVA scores `[B, H_kv, n]` (float32) from the attention of the last query `ctx.query[:, :, -1]`.

    `heads="layer"`: averaged over every query head of the layer (the paper; the same scores for all KV
    heads); `"group"`: averaged over the G query heads of each KV head. Padding and invisible entries get
    0; with `keep_last` the newest entry (the last one stored) gets +inf so it is never evicted.
    """
    if heads not in HEAD_AVERAGES:
        raise KVForgeError(f"tova: heads={heads!r}; allowed: {', '.join(HEAD_AVERAGES)}")
    probs = ctx.window_attention_sum(1)  # [B, H, G, n]: the last query's attention
    b, h, _, n = probs.shape
    if heads == "layer":
        scores = probs.mean(dim=(1, 2))[:, None].expand(b, h, n).clone()
    else:
        scores = probs.mean(2)
    if keep_last:
        scores[..., -1] = float("inf")
    return scores


@register("tova")
@dataclass
class TOVAPress(ScorerPress):
    """Score `[B, H_kv, n]` = softmax attention of the last prompt query `[B, Hq, 1, D]` to each entry, averaged
    over the heads (`head_average`: `layer` = all query heads, as the paper; `group` = the query heads of
    each KV head). The last entry is always kept. `gqa_aggregation` is not used: averaging is the method."""

    paper = "https://arxiv.org/abs/2401.06104"
    head_average: str = "layer"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "head_average", self.head_average, HEAD_AVERAGES)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return tova_scores(ctx, self.head_average)
