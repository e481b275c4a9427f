"""PyramidKV: SnapKV scores with layer budgets shrinking arithmetically from lower to upper layers.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", 2024,
https://arxiv.org/abs/2406.02069. Defaults from the paper: β = 20, window 32, kernel 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, check_float, keep_count
from kvforge.presses.registry import register
from kvforge.presses.snapkv import SnapKVPress


def pyramid_budget(average: torch.Tensor, rank: int, num_layers: int, beta: float, room: torch.Tensor):
    """Budget of layer `rank` of `num_layers` for an `average` budget per layer (both `[B]`).

    Budgets run linearly from `2·avg − avg/β` (bottom) to `avg/β` (top), so their mean is `avg`. Where
    the bottom budget would exceed `room` (entries available), every layer gets `avg` instead.
    """
    low = average.double() / beta
    high = 2 * average.double() - low
    step = (high - low) / max(num_layers - 1, 1)
    budget = (high - rank * step).round().long()
    return torch.where(high > room.double(), average, budget)


@register("pyramidkv")
@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scoring `[B, H_kv, n]`; per-layer keep counts from `pyramid_budget` (window excluded)."""

    paper = "https://arxiv.org/abs/2406.02069"
    beta: float = 20.0

    def chunk_refusal(self) -> str | None:
        return "its per-layer budgets are shares of the whole context"

    def __post_init__(self):
        super().__post_init__()
        check_float(self, "beta", self.beta, low=1)

    def host_keep_count(self, ctx: LayerContext) -> None:
        return None  # its counts vary per layer: `keep_per_row` on the device

    def keep_per_row(self, ctx: LayerContext) -> torch.Tensor:
        n = ctx.n_real
        w = torch.clamp(n, max=self.window_size)
        average = (keep_count(n, self.compression_ratio, self.budget) - w).clamp(min=0)
        return w + pyramid_budget(average, ctx.rank, ctx.num_layers, self.beta, n - w)
