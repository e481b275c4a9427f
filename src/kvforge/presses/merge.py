"""Merge wrapper: a scorer press chooses what to keep; every evicted entry is merged into its nearest kept one.

Nearest = highest cosine similarity between keys, per KV head. Two merge rules:

- ``pivot`` (KVCache-Factory's pivot merge, from LOOK-M, Wan et al. 2024, https://arxiv.org/abs/2406.18139):
  each evicted entry e first forms the pair mean `(x_e + x_j) / 2` with its target j, then j becomes the
  mean of itself and all those pair means: `x_j' = (x_j + Σ_e (x_e + x_j) / 2) / (1 + c_j)` with c_j the number
  of entries merged into j.
- ``weighted``: an attention-weighted mean, `x_j' = (a_j x_j + Σ_e a_e x_e) / (a_j + Σ_e a_e)`, where `a` is the
  mean attention an entry receives from the last `window_size` queries (mean over the GQA group); when all
  weights are 0 the kept entry is left as is.

`x` is the value and, with `merge_keys=True` (default, as KVCache-Factory), also the key. Kept entries keep
their logical slot (position). This module also holds the helpers the other merging presses (CaM, KVMerger)
share: a per-row top-k selection mask and `keep_merged` (prune, then overwrite the kept entries).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, Press, check_choice, check_int, descending_rank, keep_count
from kvforge.presses.registry import register, resolve_scorer

MERGE_METHODS = ("pivot", "weighted")
_CHUNK_ELEMENTS = 1 << 24  # similarity matrix elements computed at once (64 MiB in float32)


def topk_mask(ctx: LayerContext, scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`[B, H_kv, n]` bool: the `k[b]` highest-scoring real entries of every head of row b (ties: earlier first)."""
    rank = descending_rank(scores.float().masked_fill(~ctx.real, float("-inf")))
    return (rank < k[:, None, None]) & ctx.real


def attention_mass(ctx: LayerContext, window: int) -> torch.Tensor:
    """Mean attention each entry gets from the last `window` queries, averaged over the GQA group, `[B, H_kv, n]`."""
    w = max(1, min(window, ctx.query.shape[2]))
    return ctx.window_attention_sum(w).mean(2) / w


def keep_merged(ctx: LayerContext, selected: torch.Tensor, keys: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> None:
    """Keep the entries where `selected [B, H_kv, n]` (the same count per head within a row) and store `keys` /
    `values` (`[B, H_kv, n, D]`, read at the kept positions; None = unchanged) for them.

    Rows keeping fewer entries than the batch maximum are padded with their own invalid entries (hidden by the
    mask), exactly as `select_topk` does, so every row keeps what it would keep alone.
    """
    real = ctx.real
    kmax = int(selected.sum(-1).max())
    priority = selected.to(torch.int8) * 2 + (~real).to(torch.int8)
    idx = priority.topk(kmax, dim=-1, sorted=False).indices.sort(-1).values  # [B, H, kmax]
    layer = ctx.layer
    if (keys is not None or values is not None) and not layer.rewritable:
        raise KVForgeError("merging presses cannot rewrite entries of packed per-head storage (a per-head press "
                           "ran first on CUDA); use KVCache(..., packed=False) or put the merge press first")
    layer.keep(idx)
    if keys is None and values is None:
        return
    new_k = None if keys is None else keys.gather(2, idx[..., None].expand(*idx.shape, keys.shape[-1]))
    new_v = None if values is None else values.gather(2, idx[..., None].expand(*idx.shape, values.shape[-1]))
    layer.replace_entries(new_k, new_v)


def _indices(mask: torch.Tensor) -> torch.Tensor:
    """Physical indices `[B, H_kv, m]` of the entries where `mask [B, H_kv, n]`, in order, m = the largest count
    (heads with fewer are filled with other entries, which callers ignore)."""
    m = int(mask.sum(-1).max()) if mask.numel() else 0
    return mask.to(torch.int8).topk(m, dim=-1, sorted=False).indices.sort(-1).values


def nearest_kept(keys: torch.Tensor, selected: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """For every `evicted` entry, the physical index of the `selected` entry with the most similar key (cosine),
    `[B, H_kv, n]` (0 elsewhere). Only evicted × kept similarities are computed, in chunks of evicted entries,
    so memory stays bounded by `_CHUNK_ELEMENTS` whatever the length."""
    b, h, n, d = keys.shape
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    kept, gone = _indices(selected), _indices(evicted)
    kept_unit = unit.gather(2, kept[..., None].expand(b, h, kept.shape[-1], d))
    kept_ok = selected.gather(2, kept)[:, :, None, :]  # fillers of heads keeping fewer are never targets
    out = torch.zeros(b, h, n, dtype=torch.long, device=keys.device)
    if kept.shape[-1] == 0:
        return out
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * kept.shape[-1]))
    for s in range(0, gone.shape[-1], chunk):
        rows = gone[:, :, s : s + chunk]
        sim = torch.einsum("bhcd,bhkd->bhck", unit.gather(2, rows[..., None].expand(*rows.shape, d)), kept_unit)
        best = kept.gather(2, sim.masked_fill(~kept_ok, float("-inf")).argmax(-1))
        out.scatter_(2, rows, torch.where(evicted.gather(2, rows), best, 0))
    return out


@register("merge")
@dataclass
class MergePress(Press):
    """Wraps a scorer press (`press`: a name or a `ScorerPress`; default knorm) that picks the kept entries
    `[B, H_kv, k]`; every evicted real entry is merged into its nearest kept entry by key cosine similarity, with
    `method` = `pivot` (KVCache-Factory's pivot mean) or `weighted` (attention-weighted mean). The wrapper's
    `compression_ratio` / `budget` apply; the wrapped press's own ratio is ignored."""

    kind = "wrapper"
    paper = "https://arxiv.org/abs/2406.18139"
    press: object = field(default="knorm")
    method: str = "pivot"
    merge_keys: bool = True
    window_size: int = 32  # queries whose attention weights the `weighted` merge

    def __post_init__(self):
        super().__post_init__()
        self.press = resolve_scorer(self.name, self.press)
        check_choice(self, "method", self.method, MERGE_METHODS)
        check_int(self, "window_size", self.window_size, minimum=1)

    def compress(self, ctx: LayerContext) -> None:
        k = keep_count(ctx.n_real, self.compression_ratio, self.budget)
        if bool((k >= ctx.n_real).all()):
            return
        selected = topk_mask(ctx, self.press.score(ctx), k)
        evicted = ctx.real & ~selected
        target = nearest_kept(ctx.keys, selected, evicted)  # [B, H, n]
        moved = evicted.float()
        if self.method == "pivot":  # x_j' = (x_j·(1 + c_j/2) + Σ_e x_e/2) / (1 + c_j)
            count = torch.zeros_like(moved).scatter_add_(2, target, moved)
            weight_other, scale_self, denom = torch.full_like(moved, 0.5), 1 + count / 2, 1 + count
        else:  # x_j' = (a_j·x_j + Σ_e a_e·x_e) / (a_j + Σ_e a_e)
            a = attention_mass(ctx, self.window_size)
            weight_other, scale_self = a, a
            denom = a + torch.zeros_like(a).scatter_add_(2, target, a * moved)

        def merge(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            src = x * (weight_other * moved)[..., None]
            acc = torch.zeros_like(x).scatter_add_(2, target[..., None].expand_as(x), src)
            merged = (x * scale_self[..., None] + acc) / denom.clamp(min=1e-30)[..., None]
            return torch.where((denom > 0)[..., None], merged, x)

        keep_merged(ctx, selected, merge(ctx.keys) if self.merge_keys else None, merge(ctx.values))
