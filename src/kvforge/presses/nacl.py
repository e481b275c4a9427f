"""NaCl: proxy-token eviction plus head-wise random eviction, once, at the end of the prefill.

Chen et al., "NaCl: A General and Effective KV Cache Eviction Framework for LLMs at Inference Time",
ACL 2024, https://arxiv.org/abs/2408.03675 (official code: PaddlePaddle/Research, NLP/ACL2024-NACL).

Per layer and KV head, with k entries to keep:
- *protected*: the first `n_sink` tokens and the proxy tokens themselves (the official code protects sinks
  plus the most recent tokens; the paper keeps the proxy tokens);
- *proxy-tokens eviction*: the last `proxy_ratio` of the row's tokens (at least one) are the proxy
  tokens — in the paper the question; here, query-agnostic, the end of the context. Score of an entry =
  the attention it receives from the proxy queries, summed over them (aggregated per KV head with
  `gqa_aggregation`); the best `(1 − random_fraction)` of the remaining budget is kept by this score;
- *random eviction*: the rest of the budget is sampled without replacement, per head and per layer, from
  softmax(score) over the entries not yet kept (Gumbel-top-k, equivalent to sequential sampling).

Defaults follow the official code: proxy tokens 1% of the input; of the budget left after protection,
12 parts proxy to 7 parts random (`proxy_token_keep_ratio=0.12`, `random_token_keep_ratio=0.07`), i.e.
`random_fraction = 7/19`. The official code sizes everything as fractions of the input; here the total is
the usual `compression_ratio`/`budget` and the fractions split it. The Gumbel noise is drawn per (seed,
layer, head, token position among the row's real tokens), like `random`, so a row keeps the same entries
alone or in a padded batch, and the same seed gives the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, ScorerPress, aggregate_groups, check_float, check_int, descending_rank
from kvforge.presses.registry import register


def gumbel_table(seed: int, layer_idx: int, h: int, n: int, device) -> torch.Tensor:
    """Gumbel(0, 1) noise `[H, n]`, drawn position-major so any prefix equals a shorter draw."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + layer_idx * 7919 + 17)
    u = torch.rand(n, h, generator=g, dtype=torch.float64).clamp(1e-12, 1.0 - 1e-12)
    return (-torch.log(-torch.log(u))).T.float().to(device)


@register("nacl")
@dataclass
class NaClPress(ScorerPress):
    """Selection as a score `[B, H_kv, n]`: +inf for protected entries (sinks, proxy tokens), then the top
    proxy-scored entries, then the random picks (Gumbel-top-k over softmax(proxy score)); the base keeps
    the k best. Proxy scores come from the last `proxy_ratio` of the queries `[B, Hq, q, D]`."""

    paper = "https://arxiv.org/abs/2408.03675"
    proxy_ratio: float = 0.01
    random_fraction: float = 7 / 19
    n_sink: int = 4
    seed: int = 0

    def chunk_refusal(self) -> str | None:
        return "its proxy queries are a share of the whole context"

    def __post_init__(self):
        super().__post_init__()
        check_float(self, "proxy_ratio", self.proxy_ratio, 0, 1, low_open=True, high_open=True)
        check_float(self, "random_fraction", self.random_fraction, 0, 1)
        check_int(self, "n_sink", self.n_sink, minimum=0)

    def n_proxy(self, n_real: torch.Tensor) -> torch.Tensor:
        """Proxy tokens per row `[B]`: the last `proxy_ratio` of its real tokens, at least one."""
        return (n_real.double() * self.proxy_ratio).long().clamp(min=1)

    def proxy_scores(self, ctx: LayerContext) -> torch.Tensor:
        """Attention from each row's proxy queries, summed over them, per KV head `[B, H_kv, n]` (float32)."""
        q = ctx.query.shape[2]
        n_proxy = self.n_proxy(ctx.n_real).clamp(max=q)  # [B]
        fewest, w = n_proxy.aminmax()
        fewest, w = torch.stack([fewest, w]).tolist()  # one read back for both
        if fewest == w:  # every row's proxies are the whole window (e.g. a plain prefill)
            return aggregate_groups(ctx.window_attention_sum(w), self.gqa_aggregation)
        probs = ctx.window_attention(w)  # [B, H, G, w, n]
        rows = torch.arange(w, device=probs.device)[None] >= (w - n_proxy)[:, None]  # [B, w]
        probs = probs * rows[:, None, None, :, None]
        return aggregate_groups(probs.sum(3), self.gqa_aggregation)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        real, idx = ctx.real, ctx.token_index
        b, h, n = real.shape
        s = self.proxy_scores(ctx).masked_fill(~real, float("-inf"))
        n_real = ctx.n_real
        protected = real & ((idx < self.n_sink) | (idx >= (n_real - self.n_proxy(n_real))[:, None, None]))
        k = self.keep_per_row(ctx)  # [B]
        left = (k[:, None] - protected.sum(-1)).clamp(min=0)  # [B, H] budget after protection
        n_top = left - (left.double() * self.random_fraction).round().long()  # [B, H]
        free = real & ~protected
        top_rank = descending_rank(s.masked_fill(~free, float("-inf")))
        is_top = free & (top_rank < n_top[..., None])
        rest = free & ~is_top
        noise = gumbel_table(self.seed, ctx.layer_idx, h, n, s.device)[None].expand(b, h, n)
        noise = noise.gather(2, idx.clamp(min=0))
        keys = (s + noise).masked_fill(~rest, float("-inf"))  # log softmax(s) + Gumbel, up to a constant
        rand_rank = descending_rank(keys).float()
        scores = (-rand_rank).masked_fill(is_top, float(n + 1))
        return scores.masked_fill(protected, float("inf"))
