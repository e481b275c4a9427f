"""Knorm: keep keys with the lowest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024,
https://arxiv.org/abs/2406.11430 — low key norms go with high attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, ScorerPress
from kvforge.presses.registry import register


@register("knorm")
@dataclass
class KnormPress(ScorerPress):
    """Score = −‖k‖₂ per entry, `[B, H_kv, n]`. Query-agnostic, no extra pass."""

    paper = "https://arxiv.org/abs/2406.11430"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -torch.linalg.vector_norm(ctx.keys, dim=-1, dtype=torch.float32)  # no float32 copy of the keys
