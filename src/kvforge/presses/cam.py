"""CaM: evict by a scorer, then merge each evicted value into the kept values that follow it.

Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024,
https://proceedings.mlr.press/v235/zhang24n.html (code: github.com/zyxxmu/cam).

The paper's rule (applied there at every decode step to the one token leaving the recent window): the evicted
value `v_e` is added, divided by `m`, to the values of the next `m` tokens, with probability
`p_e = min(1, A_e / Ā)` — the ratio of the attention the evicted token receives to the mean attention of the
tokens it merges into (a Bernoulli mask; keys are not merged).

Our prefill version, per KV head, for every evicted real entry e at once (kept set from the scorer):

- `T_e` = the next `m_e = min(merge_budget, kept entries after e)` kept entries after e (position order);
  an evicted entry with no kept entry after it is dropped unmerged;
- `a` = mean attention each entry receives from the last `window_size` queries (mean over the GQA group);
- `p_e = clamp(a_e / mean_{j ∈ T_e} a_j, 0, 1)` (0 when that mean is 0);
- `v_j ← v_j + Σ_{e : j ∈ T_e} p_e · v_e / m_e` — kept keys are unchanged.

Simplifications: the Bernoulli draw is replaced by its expectation `p_e` (deterministic, and a row gives the
same result alone or in a batch); all merges are computed from the original values (the paper merges one token
per step, so later merges see earlier ones); `/ m_e` instead of `/ m` only differs for the last evicted entries,
which have fewer than m kept successors, and keeps the merged mass at `p_e · v_e`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvforge.presses.base import LayerContext, Press, check_int, keep_count
from kvforge.presses.merge import attention_mass, keep_merged, topk_mask
from kvforge.presses.registry import register, resolve_scorer


def _forward_window_sum(x: torch.Tensor, m: int) -> torch.Tensor:
    """`out[..., c] = Σ_{j=c}^{c+m-1} x[..., j]` (zeros past the end), for `x [..., K]` or `[..., K, D]` along K."""
    if x.dim() == 4:  # [B, H, K, D] -> pool along K per channel
        b, h, kk, d = x.shape
        return _forward_window_sum(x.permute(0, 1, 3, 2).reshape(b, h * d, kk), m).reshape(b, h, d, kk).permute(
            0, 1, 3, 2)
    return F.avg_pool1d(F.pad(x, (0, m - 1)), m, stride=1) * m


def _backward_window_sum(x: torch.Tensor, m: int) -> torch.Tensor:
    """`out[..., r] = Σ_{c=r-m+1}^{r} x[..., c]` along axis 2 of `x [B, H, K, D]`."""
    return _forward_window_sum(x.flip(2), m).flip(2)


@register("cam")
@dataclass
class CaMPress(Press):
    """Scorer press `press` (name or instance; default snapkv) picks the kept entries `[B, H_kv, k]`; each evicted
    value `[D]` is merged into the values of the next `merge_budget` kept entries, weighted by
    `p_e / m_e` with `p_e = clamp(a_e / mean a(targets), 0, 1)` from the attention `a [B, H_kv, n]` of the last
    `window_size` queries. Keys are not merged. The wrapper's `compression_ratio` / `budget` apply."""

    kind = "merge"
    paper = "https://proceedings.mlr.press/v235/zhang24n.html"
    press: object = field(default="snapkv")
    merge_budget: int = 32
    window_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        self.press = resolve_scorer(self.name, self.press)
        check_int(self, "merge_budget", self.merge_budget, minimum=1)
        check_int(self, "window_size", self.window_size, minimum=1)

    def merged_values(self, ctx: LayerContext, selected: torch.Tensor) -> torch.Tensor:
        """Values `[B, H_kv, n, D]` (float32) after merging the evicted entries into the kept ones of `selected`."""
        m = self.merge_budget
        values = ctx.values.float()
        b, h, n, d = values.shape
        a = attention_mass(ctx, self.window_size)  # [B, H, n]
        kept_total = selected.sum(-1, keepdim=True)  # [B, H, 1]
        kmax = int(kept_total.max())
        before = selected.long().cumsum(-1)  # kept entries at or before each position
        kept_rank = (before - 1).clamp(min=0)  # rank of a kept entry among the kept (position order)
        after_start = before  # rank of the first kept entry after an evicted one
        evicted = ctx.real & ~selected & (after_start < kept_total)
        # mean attention of each possible target run [c, c + m_c), m_c = min(m, K - c)
        a_kept = torch.zeros(b, h, kmax + 1, device=a.device).scatter_add_(2, kept_rank, a * selected)[..., :kmax]
        span = (kept_total - torch.arange(kmax, device=a.device)).clamp(min=1, max=m)  # m_c  [B, H, kmax]
        run_mean = _forward_window_sum(a_kept, m) / span
        c = after_start.clamp(max=max(kmax - 1, 0))
        target_mean = run_mean.gather(2, c)
        p = torch.where(target_mean > 0, (a / target_mean.clamp(min=1e-30)).clamp(0.0, 1.0), torch.zeros_like(a))
        weight = torch.where(evicted, p / span.gather(2, c), torch.zeros_like(p))  # p_e / m_e
        contrib = torch.zeros(b, h, kmax, d, device=values.device)
        contrib.scatter_add_(2, c[..., None].expand(b, h, n, d), values * weight[..., None])
        added = _backward_window_sum(contrib, m)  # [B, H, kmax, D]: Σ over e with j ∈ T_e
        gathered = added.gather(2, kept_rank[..., None].expand(b, h, n, d))
        return values + gathered * selected[..., None]

    def compress(self, ctx: LayerContext) -> None:
        k = keep_count(ctx.n_real, self.compression_ratio, self.budget)
        if bool((k >= ctx.n_real).all()):
            return
        selected = topk_mask(ctx, self.press.score(ctx), k)
        if not bool(selected.any()):
            keep_merged(ctx, selected)
            return
        keep_merged(ctx, selected, values=self.merged_values(ctx, selected))
