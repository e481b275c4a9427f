"""Random eviction: a baseline every method should beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, ScorerPress
from kvforge.presses.registry import register


@register("random")
@dataclass
class RandomPress(ScorerPress):
    """Keep a uniformly random subset of entries per head. Scores `[B, H_kv, n]` are drawn per (layer, head,
    token position among the row's real tokens), so a row scores the same alone or in a padded batch."""

    paper = "baseline (kvpress RandomPress)"
    seed: int = 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        b, h, n = ctx.keys.shape[:3]
        g = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + ctx.layer_idx)
        table = torch.rand(n, h, generator=g).T.to(ctx.keys.device)  # position-major: a prefix of any longer draw
        return table[None].expand(b, h, n).gather(2, ctx.token_index.clamp(min=0))
