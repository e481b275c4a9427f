"""SnapKV: keep the entries the last prompt tokens (the observation window) attend to most.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469. Defaults from the paper: window 32, pooling kernel 7.
In the query-agnostic setting (kvpress's) the window is the end of the *context*, not the question.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, ScorerPress, aggregate_groups, check_choice, check_int
from kvforge.presses.registry import register


@register("snapkv")
@dataclass
class SnapKVPress(ScorerPress):
    """Score `[B, H_kv, n]`: attention of the window queries `[B, Hq, w, D]` to each entry, summed over
    the window, aggregated per KV head, then 1-D pooled along the sequence; window entries always kept."""

    paper = "https://arxiv.org/abs/2404.14469"
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "avg"  # avg | max

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "pooling", self.pooling, ("avg", "max"))
        check_int(self, "window_size", self.window_size, minimum=1)
        check_int(self, "kernel_size", self.kernel_size, minimum=1, hint="odd")
        if self.kernel_size % 2 == 0:
            raise KVForgeError(f"{self.name}: kernel_size={self.kernel_size!r}; allowed: an odd integer >= 1")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        n = ctx.keys.shape[2]
        w = min(self.window_size, ctx.query.shape[2], n)
        sums = ctx.window_attention_sum(w)  # [B, H, G, n]: attention from the w window queries, summed
        prefix = aggregate_groups(sums[..., : n - w], self.gqa_aggregation)  # [B, H, n - w]
        b, h = prefix.shape[:2]
        flat = prefix.reshape(b * h, 1, n - w)
        pad = self.kernel_size // 2
        if n - w > 0 and self.pooling == "max":
            flat = F.max_pool1d(flat, self.kernel_size, stride=1, padding=pad)
        elif n - w > 0:
            flat = F.avg_pool1d(flat, self.kernel_size, stride=1, padding=pad)
        scores = torch.full((b, h, n), float("inf"), device=prefix.device)
        scores[:, :, : n - w] = flat.reshape(b, h, n - w)  # the window itself is always kept
        return scores
