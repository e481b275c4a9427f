"""KVMerger: merge runs of adjacent entries with cosine-similar keys into one entry, Gaussian-kernel weighted.

Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context Tasks", 2024,
https://arxiv.org/abs/2407.08454.

Per KV head:

1. *Merging sets.* Adjacent entries i, i+1 may join when `cos(k_i, k_{i+1}) >= threshold` (the paper's
   observation: similar keys come in runs of neighbours). To meet the keep count k exactly, the `n - k`
   most similar qualifying adjacent pairs are joined (each join removes one entry); the last `window_size`
   real entries of each head (the observation window) never join and are always kept.
2. *Pivot.* In each run, the entry that receives the most attention from the window queries (ties: the
   earliest) is the pivot; the merged entry takes its slot (position).
3. *Gaussian kernel weights.* `g_i = exp(-‖k_i − k_p‖² / (2σ²))` (g_p = 1) with the adaptive bandwidth
   `σ = Σ_{i∈S} ‖k_i − k_p‖ / (√2·|S|)` (mean distance to the pivot over the run, / √2; override with `sigma`);
   `w_i = g_i / Σ_S g`; merged key `Σ w_i k_i` and merged value `Σ w_i v_i`.
4. If too few pairs qualify, the runs (singletons included) that receive the least attention (summed over the
   run) are evicted until k remain.

Simplifications: one threshold for every layer (the paper calibrates per-layer thresholds offline); the run
search is a single pass over adjacent pairs ranked by similarity rather than the paper's sequential scan, and
it joins only as many pairs as the budget needs; when similarity alone cannot reach the budget, evicting the
least-attended runs (step 4) is our choice, so that every head keeps exactly k entries like the other presses.
The bandwidth formula is our reading of the paper's adaptive σ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, Press, check_float, check_int, descending_rank, keep_count
from kvforge.presses.merge import attention_mass, keep_merged
from kvforge.presses.registry import register


@register("kvmerger")
@dataclass
class KVMergerPress(Press):
    """Keys/values `[B, H_kv, n, D]` -> runs of adjacent entries with `cos(k_i, k_{i+1}) >= threshold` merged into
    their pivot (the most-attended entry of the run, attention `[B, H_kv, n]` of the last `window_size` queries)
    with Gaussian-kernel weights; exactly k entries per head remain (attention-based eviction fills any gap)."""

    kind = "merge"
    paper = "https://arxiv.org/abs/2407.08454"
    threshold: float = 0.75
    window_size: int = 32
    sigma: float | None = None  # fixed kernel bandwidth; None = the adaptive per-run bandwidth

    def __post_init__(self):
        super().__post_init__()
        check_float(self, "threshold", self.threshold, -1, 1, hint="a cosine similarity")
        check_int(self, "window_size", self.window_size, minimum=0)
        check_float(self, "sigma", self.sigma, low=0, low_open=True, optional=True,
                    hint="None for the adaptive bandwidth")

    def window(self, ctx: LayerContext) -> torch.Tensor:
        """`[B, H_kv, n]` bool: the last `window_size` real entries of each head (never merged, always kept)."""
        count = ctx.real.sum(-1, keepdim=True)
        return ctx.real & (ctx.token_index >= count - self.window_size)

    def runs(self, ctx: LayerContext, k: torch.Tensor) -> torch.Tensor:
        """Run id of every entry `[B, H_kv, n]` (runs numbered from 0 in position order)."""
        keys, real = ctx.keys.float(), ctx.real
        b, h, n, _ = keys.shape
        unit = torch.nn.functional.normalize(keys, dim=-1)
        sim = (unit[:, :, :-1] * unit[:, :, 1:]).sum(-1)  # [B, H, n-1]: entry i with i+1
        protected = self.window(ctx)
        free = real & ~protected
        eligible = free[:, :, :-1] & free[:, :, 1:] & (sim >= self.threshold)
        need = (ctx.n_real - k).clamp(min=0)  # joins wanted per row
        rank = descending_rank(sim.masked_fill(~eligible, float("-inf")))
        join = eligible & (rank < need[:, None, None])
        starts = torch.ones_like(real)
        starts[:, :, 1:] = ~join
        return starts.long().cumsum(-1) - 1

    def compress(self, ctx: LayerContext) -> None:
        k = keep_count(ctx.n_real, self.compression_ratio, self.budget)
        if bool((k >= ctx.n_real).all()):
            return
        keys, values, real = ctx.keys.float(), ctx.values.float(), ctx.real
        b, h, n, d = keys.shape
        run = self.runs(ctx, k)  # [B, H, n]
        a = attention_mass(ctx, self.window_size)
        pos = torch.arange(n, device=keys.device).expand(b, h, n)
        # pivot: most-attended entry of its run, the earliest on ties
        run_max = torch.full((b, h, n), float("-inf"), device=a.device).scatter_reduce(2, run, a, "amax")
        cand = a >= run_max.gather(2, run)
        first = torch.full((b, h, n), n, device=a.device, dtype=torch.long).scatter_reduce(
            2, run, torch.where(cand, pos, n), "amin")
        pivot_of = first.gather(2, run)  # physical index of each entry's pivot
        is_pivot = pivot_of == pos
        # Gaussian kernel weights around the pivot key
        dist = (keys - keys.gather(2, pivot_of[..., None].expand(b, h, n, d))).norm(dim=-1)  # [B, H, n]
        size = torch.zeros(b, h, n, device=a.device).scatter_add_(2, run, torch.ones_like(a))
        if self.sigma is None:
            dist_sum = torch.zeros_like(size).scatter_add_(2, run, dist)
            sigma = (dist_sum / (math.sqrt(2.0) * size.clamp(min=1))).gather(2, run)
        else:
            sigma = torch.full_like(dist, float(self.sigma))
        g = torch.where(sigma > 0, torch.exp(-dist.square() / (2 * sigma.square().clamp(min=1e-30))),
                        torch.ones_like(dist))
        g_sum = torch.zeros_like(size).scatter_add_(2, run, g)
        w = g / g_sum.gather(2, run)  # [B, H, n], sums to 1 over each run
        idx = run[..., None].expand(b, h, n, d)
        merged_k = torch.zeros_like(keys).scatter_add_(2, idx, keys * w[..., None]).gather(2, idx)
        merged_v = torch.zeros_like(values).scatter_add_(2, idx, values * w[..., None]).gather(2, idx)
        # keep k pivots per head: evict the least-attended runs if similarity could not reach the budget
        run_attn = torch.zeros_like(size).scatter_add_(2, run, a).gather(2, run)
        run_attn = run_attn.masked_fill(self.window(ctx), float("inf"))
        score = torch.where(is_pivot & real, run_attn.clamp(min=-3e38), torch.full_like(a, float("-inf")))
        selected = (descending_rank(score) < k[:, None, None]) & is_pivot & real
        keep_merged(ctx, selected, merged_k, merged_v)
