"""Observed attention: the prefill form of H2O — keep the entries that received the most attention.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023, https://arxiv.org/abs/2306.14048. H2O evicts at every decode step by the attention each
entry accumulated; this is its one-shot prefill form, as kvpress's `ObservedAttentionPress`: the score of
an entry is the attention it received from every prefill query, divided by the number of queries that can
see it (kvpress divides by `n - j` under a causal mask, so late entries are not penalised for having been
seen by fewer queries). `normalize=False` gives H2O's plain accumulated sum.

kvpress needs eager attention to get the probabilities; here they are recomputed from the recorded
queries in chunks of query rows, so the prefill itself keeps using the fast backend and memory stays
bounded (one `[B, Hq, chunk, n]` block at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, ScorerPress, aggregate_groups, check_int
from kvforge.presses.registry import register

CHUNK_ELEMENTS = 1 << 25  # float32 logits per query chunk (128 MiB)


def accumulated_attention(ctx: LayerContext, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention every entry received from all of this forward's queries.

    Returns `(received [B, Hq, n], seen_by [B, 1 | H_kv, n])`: the summed softmax probabilities (float32)
    per query head, and how many queries could attend each entry (from `ctx.mask()`; padding queries see
    no real entry, so they count for nothing).
    """
    b, hq, q, d = ctx.query.shape
    h, n = ctx.keys.shape[1], ctx.keys.shape[2]
    g = ctx.groups
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, b * hq * n))
    keys = ctx.keys.float()
    received = torch.zeros(b, h, g, n, device=keys.device)
    seen_by = None
    for start in range(0, q, chunk):
        stop = min(q, start + chunk)
        qc = ctx.query[:, :, start:stop].float().reshape(b, h, g, stop - start, d)
        logits = torch.einsum("bhgqd,bhnd->bhgqn", qc, keys) * ctx.scaling
        mask = ctx.mask(slice(start, stop))  # [B, 1 | H, r, n]
        if mask.dtype != torch.bool:
            mask = mask == 0
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        received += torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(3)
        count = mask.sum(2)  # [B, 1 | H, n]
        seen_by = count if seen_by is None else seen_by + count
    return received.reshape(b, hq, n), seen_by


@register("observed_attention")
@dataclass
class ObservedAttentionPress(ScorerPress):
    """Score `[B, H_kv, n]` = Σ_i softmax(q_i·K)_j over all prefill queries i `[B, Hq, q, D]`, divided by the
    number of queries that see entry j (`normalize`), aggregated per KV head (`gqa_aggregation`).

    Recomputes the prefill attention (O(q·n) per layer, chunked); no window is protected (kvpress).
    """

    query_aware = False
    paper = "https://arxiv.org/abs/2306.14048"
    normalize: bool = True
    query_chunk: int | None = None  # query rows per chunk; None = sized to ~128 MiB of logits

    def chunk_refusal(self) -> str | None:
        return "it scores with the attention of every context query over the whole context"

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "query_chunk", self.query_chunk, minimum=1, optional=True)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        received, seen_by = accumulated_attention(ctx, self.query_chunk)
        b, hq, n = received.shape
        h = ctx.keys.shape[1]
        if self.normalize:
            seen = seen_by.float().clamp(min=1.0)  # [B, 1 | H, n]
            received = (received.reshape(b, h, hq // h, n) / seen[:, :, None]).reshape(b, hq, n)
        return aggregate_groups(received.reshape(b, h, hq // h, n), self.gqa_aggregation)
