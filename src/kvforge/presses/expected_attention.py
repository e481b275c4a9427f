"""Expected attention: score each entry by the attention that *future* queries are expected to pay it.

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution", 2025, https://arxiv.org/abs/2510.00636 (kvpress `ExpectedAttentionPress`; defaults from
kvpress: 512 future positions, 4 sinks, covariance and value norms on, epsilon 0).

Method (per layer, per row, per query head):
1. take this forward's queries except the first `n_sink` tokens and undo their RoPE (rotate each query
   back by its own position), giving pre-RoPE queries q̃; estimate their mean μ̃ and covariance Σ̃
   (kvpress projects the pre-norm hidden states with W_q instead; undoing RoPE on the final queries gives
   the same pre-RoPE queries and also covers q-norm models — Qwen3, Gemma3 — which kvpress rejects);
2. average the RoPE rotation over the next `n_future_positions` positions, R̄ = mean_t R_t (t from the
   row's length on), and set μ = R̄ μ̃, Σ = R̄ Σ̃ R̄ᵀ (kvpress's "average rotation");
3. for a Gaussian query q ~ N(μ, Σ), E[exp(s q·k)] = exp(s μ·k + s² kᵀΣk / 2) (s = the layer's scaling;
   kvpress writes 1/√d); softmax these logits over the non-sink entries → expected attention;
4. average over the query heads of each KV head (`gqa_aggregation`), then multiply by the value norm:
   (p + epsilon)·‖v‖. Sink entries are always kept.

RoPE frequencies and channel pairs come from `kvforge.rope` (per layer type for Gemma3, partial rotary for Phi3,
interleaved pairs for Cohere and GLM, none on NoPE layers); dynamic/long-rope rescaling is not modelled. Without
RoPE (or a module to read it from) step 1-2 use the queries as they are.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, ScorerPress, aggregate_groups, check_float, check_int
from kvforge.presses.registry import register
from kvforge.rope import Rope, join, layer_rope, pairs

_ROPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def module_rope(module) -> Rope | None:
    """The RoPE of attention `module` (`kvforge.rope.layer_rope`, once per module), or None when it has none
    (no RoPE in the model, a NoPE layer, or a module without `config` and `layer_idx`)."""
    if module is None:
        return None
    if module in _ROPES:
        return _ROPES[module]
    config, layer_idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    rope = layer_rope(config, layer_idx) if config is not None and isinstance(layer_idx, int) else None
    try:
        _ROPES[module] = rope
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return rope


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Apply a (possibly averaged) RoPE rotation to the last axis of `x` `[..., D]`.

    `cos`/`sin` `[..., r/2]` broadcast against each half of the rotated channel pairs (`kvforge.rope.pairs`: i and
    i + r/2, or 2i and 2i + 1 for Cohere and GLM); the other channels pass through (partial rotary).
    """
    x1, x2 = pairs(x, rope)
    return join(x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rope.rotary_dim :], rope)


def query_statistics(ctx: LayerContext, n_sink: int, n_future: int, use_covariance: bool,
                     stat_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean `[B, Hq, D]` and covariance `[B, Hq, D, D]` (or None) of the future queries, float32.

    Statistics come from this forward's real queries at positions >= `n_sink` (and within the last
    `stat_window` tokens when given), moved to the average rotation of the next `n_future` positions.
    """
    b, hq, q, d = ctx.query.shape
    n = ctx.keys.shape[2]
    pos = ctx.token_index[:, 0, n - q :]  # [B, q] position of each query among its row's real tokens
    use = ctx.real[:, 0, n - q :] & (pos >= n_sink)
    if stat_window is not None:
        use &= pos >= (ctx.n_real[:, None] - stat_window)
    weight = use.float()[:, None, :, None]  # [B, 1, q, 1]
    count = use.sum(-1).clamp(min=1).float()[:, None, None]  # [B, 1, 1]
    queries = ctx.query.float()
    rope = module_rope(ctx.module)
    if rope is not None:
        inv = rope.inv_freq.to(queries.device)
        ang = pos.clamp(min=0).float()[..., None] * inv  # [B, q, r/2]
        queries = rotate(queries, ang.cos()[:, None], -ang.sin()[:, None], rope)  # undo RoPE: pre-RoPE queries
    mu = (queries * weight).sum(2) / count  # [B, Hq, D]
    cov = None
    if use_covariance:
        centered = (queries - mu[:, :, None]) * weight
        cov = torch.einsum("bhqi,bhqj->bhij", centered, centered) / count[..., None]
    if rope is not None:
        t = ctx.n_real[:, None].float() + torch.arange(n_future, device=queries.device).float()  # [B, F]
        ang = t[..., None] * inv  # [B, F, r/2]
        cos, sin = ang.cos().mean(1), ang.sin().mean(1)  # [B, r/2]: the average rotation R̄
        mu = rotate(mu, cos[:, None], sin[:, None], rope)
        if cov is not None:
            cov = rotate(cov, cos[:, None, None], sin[:, None, None], rope)  # Σ R̄ᵀ
            cov = rotate(cov.transpose(-1, -2), cos[:, None, None], sin[:, None, None], rope).transpose(-1, -2)
    return mu, cov


@register("expected_attention")
@dataclass
class ExpectedAttentionPress(ScorerPress):
    """Score `[B, H_kv, n]` = (E[softmax attention of a future query] + epsilon) × ‖v‖, from the mean
    `[B, Hq, D]` and covariance `[B, Hq, D, D]` of the prefill queries `[B, Hq, q, D]` rotated to the next
    `n_future_positions` positions; the first `n_sink` entries are always kept.

    `stat_window`: None (kvpress: every prefill query after the sinks) or the number of last tokens whose
    queries give the statistics.
    """

    paper = "https://arxiv.org/abs/2510.00636"
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    stat_window: int | None = None

    def chunk_refusal(self) -> str | None:
        return "its query statistics and future positions assume the whole context is stored"

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "n_future_positions", self.n_future_positions, minimum=1)
        check_int(self, "n_sink", self.n_sink, minimum=0)
        check_float(self, "epsilon", self.epsilon, low=0)
        check_int(self, "stat_window", self.stat_window, minimum=1, optional=True)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        mu, cov = query_statistics(ctx, self.n_sink, self.n_future_positions, self.use_covariance,
                                   self.stat_window)
        keys = ctx.keys.float()  # [B, H, n, D]
        b, h, n, d = keys.shape
        g = ctx.groups
        s = ctx.scaling
        mu = mu.reshape(b, h, g, d)
        logits = torch.einsum("bhgd,bhnd->bhgn", mu, keys) * s
        if cov is not None:
            cov = cov.reshape(b, h, g, d, d)
            quad = torch.stack([((keys @ cov[:, :, i]) * keys).sum(-1) for i in range(g)], dim=2)
            logits = logits + quad * (s * s / 2)
        sink = ctx.token_index < self.n_sink
        candidates = ctx.real & ~sink
        logits = logits.masked_fill(~candidates[:, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        scores = aggregate_groups(probs, self.gqa_aggregation)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * ctx.values.float().norm(dim=-1)
        return scores.masked_fill(sink & ctx.real, float("inf"))
