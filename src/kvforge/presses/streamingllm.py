"""StreamingLLM as a prefill press: keep the first `n_sink` tokens (attention sinks) and the most recent ones.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453 (4 sink tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, ScorerPress
from kvforge.presses.registry import register


@register("streamingllm")
@dataclass
class StreamingLLMPress(ScorerPress):
    """Score = +inf for the first `n_sink` real tokens, else the token's position (recent = high)."""

    paper = "https://arxiv.org/abs/2309.17453"
    n_sink: int = 4

    def score(self, ctx: LayerContext) -> torch.Tensor:
        idx = ctx.token_index.float()
        return torch.where(ctx.token_index < self.n_sink, torch.full_like(idx, float("inf")), idx)
