"""Putting cached documents side by side: one `KVCache` for `[prefix][doc 1][fresh …]…[doc N][fresh …]`.

Every piece has a global position range. A *cached* piece is a `DocKV` encoded alone at position 0: its keys are
re-rotated by its offset (`kvforge.rope.rotate`, exact) and its entries placed at their global positions. A *fresh*
piece (link tokens, or a document's first k tokens recomputed CacheBlend-style) is run through the model at
request time and sees every earlier position — the segment mask's rule for tokens outside documents.

With no fresh pieces the cache is built directly. Otherwise all fresh tokens run in one forward over an
*assembly* cache: every layer (sliding ones too) holds its cached entries with logical slots = global positions
(gaps where fresh tokens go), fresh tokens are appended at slots `S, S + 1, …` (S = total length), and a 4-D mask
in slot space says who sees whom (by position; sliding layers also by `position difference < window`, as
transformers defines the window). Afterwards every layer is rebuilt in position order, so the result is an
ordinary cache of S tokens: full layers contiguous (or per-head with slots, for press-compressed documents),
sliding layers transformers' own layer holding the last `window - 1` positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvforge.cache import DenseLayer, HeadVarlenLayer, KVCache, layer_plan
from kvforge.config import enable_kvforge_attention, text_config
from kvforge.errors import KVForgeError
from kvforge.link.docs import DocKV
from kvforge.rope import rope_for_layer, rotate

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class Cached:
    """A stored document (or template prefix) placed at its position; its first `drop` tokens are not taken from
    the cache (a `Fresh` piece of the same tokens recomputes them)."""

    doc: DocKV
    drop: int = 0


@dataclass
class Fresh:
    """Token ids computed at request time, seeing every earlier position."""

    ids: list[int]


def check_plan(model) -> list[str]:
    plan = layer_plan(model)
    other = sorted(set(plan) - {FULL, SLIDING})
    if other:
        raise KVForgeError(f"document reuse supports full-attention and sliding-window layers; this model has "
                           f"{other[0]!r}")
    return plan


def window_of(model) -> int | None:
    return getattr(text_config(model), "sliding_window", None)


def layer_masks(model, qpos: torch.Tensor, kpos: torch.Tensor, allowed: torch.Tensor):
    """The attention mask(s) for a forward whose queries sit at positions `qpos [q]` and keys at `kpos [k]`, where
    `allowed [B, 1, q, k]` (bool) already says who may see whom: sliding layers also need `qpos − kpos < window`.
    Returns one tensor when all layers are of one kind, else transformers' per-kind dict."""
    plan = check_plan(model)
    masks = {FULL: allowed}
    if SLIDING in plan:
        masks[SLIDING] = allowed & ((qpos[:, None] - kpos[None, :]) < window_of(model))[None, None]
    kinds = set(plan)
    return masks[plan[0]] if len(kinds) == 1 else {k: masks[k] for k in kinds}


def segment_mask(segments: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """KVLink's mask `[B, 1, T, T]` (True = attend) from segment ids `[B, T]` (0 outside documents, k ≥ 1 for
    document k): i sees j when j ≤ i and (seg[i] == seg[j] or seg[i] == 0). `valid [B, T]`: False for padding,
    which sees only itself and is seen by nobody."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    seg_i, seg_j = segments[:, :, None], segments[:, None, :]
    m = causal & ((seg_i == seg_j) | (seg_i == 0))
    if valid is not None:
        m = m & valid[:, :, None] & valid[:, None, :]
        m = m | torch.eye(t, dtype=torch.bool, device=segments.device)
    return m[:, None]


def sliding_layer(window: int, keys: torch.Tensor, values: torch.Tensor, seen: int) -> DynamicSlidingWindowLayer:
    """transformers' sliding-window layer holding the last `window − 1` tokens' keys/values `[B, H, w, D]` of a
    sequence of `seen` tokens."""
    layer = DynamicSlidingWindowLayer(window)
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values, layer.cumulative_length = keys, values, seen
    return layer


def _place(pieces: list, n_layers: int) -> tuple[list, list[int], list[int], int, list[int]]:
    """Global positions of every piece: (cached pieces with the position of their first kept token, fresh ids,
    fresh positions, total length S, the ids of the whole sequence)."""
    pos, fresh_ids, fresh_pos, seq, cached = 0, [], [], [], []
    for p in pieces:
        if isinstance(p, Fresh):
            fresh_ids += p.ids
            fresh_pos += range(pos, pos + len(p.ids))
            seq += p.ids
            pos += len(p.ids)
            continue
        if len(p.doc.layers) != n_layers:
            raise KVForgeError(f"a stored document has {len(p.doc.layers)} layers; the model has {n_layers}")
        if p.drop < p.doc.n_tokens:
            cached.append((p, pos))
        seq += p.doc.ids[p.drop :]
        pos += p.doc.n_tokens - p.drop
    return cached, fresh_ids, fresh_pos, pos, seq


def _compact(keys, values, pos, valid) -> tuple:
    """Drop invalid entries when every head has the same ones (a document's recomputed first tokens, sliding
    layers); per-head validity (a press's budgets) stays as it is."""
    if valid is None or not bool((valid == valid[:, :1]).all()):
        return keys, values, pos, valid
    keep = valid[0, 0]
    return keys[:, :, keep], values[:, :, keep], pos[:, :, keep], None


def _cached_entries(cached: list, layer_idx: int, rope) -> tuple:
    """Keys (re-rotated to their global positions), values, global positions `[1, H, N]` and validity `[1, H, N]`
    (None when all valid) of every cached piece, side by side. One rotation per layer: a Δ per entry."""
    keys, values, slots, valid, delta = [], [], [], [], []
    for piece, offset in cached:
        lk = piece.doc.layers[layer_idx]
        start = offset - piece.drop  # where the document's position 0 goes
        local = lk.positions()
        keep = local >= piece.drop
        keys.append(lk.keys)
        values.append(lk.values)
        slots.append(local + start)
        valid.append(keep if lk.valid is None else keep & lk.valid)
        delta.append(torch.full((lk.keys.shape[2],), start, device=lk.keys.device))
    keys, values, slots, valid = (torch.cat(x, dim=2) for x in (keys, values, slots, valid))
    keys = rotate(keys, torch.cat(delta), rope)
    return _compact(keys, values, slots, None if bool(valid.all()) else valid)


def _full_layer(keys, values, pos, valid, total: int, reserve: int) -> DenseLayer:
    """A full-attention layer holding entries at positions `pos [1, H, N]`: contiguous when they are exactly
    0..total−1 (shared by every head), else with slots (and validity)."""
    if valid is None:
        order = pos[0, 0].argsort()
        if bool((pos == pos[:, :1]).all()) and bool((pos[0, 0, order] == torch.arange(total, device=pos.device)).all()):
            return DenseLayer.from_entries(keys[:, :, order], values[:, :, order], reserve=reserve)
        return DenseLayer.from_entries(keys, values, pos, logical=total, reserve=reserve)
    return HeadVarlenLayer.from_entries(keys, values, pos, valid, logical=total, reserve=reserve)


def _sliding_final(window: int, keys, values, pos, valid, total: int) -> DynamicSlidingWindowLayer:
    """The last `window − 1` positions, in order: every earlier one is outside any later token's window."""
    keys, values, pos, valid = _compact(keys, values, pos, valid)
    if valid is not None:
        raise KVForgeError("sliding-window layers hold every token; a press cannot have removed entries there")
    row = pos[0, 0]
    order = row.argsort()
    order = order[row[order] >= total - (window - 1)]
    return sliding_layer(window, keys[:, :, order].contiguous(), values[:, :, order].contiguous(), total)


@torch.inference_mode()
def build_cache(model, pieces: list, reserve: int = 256) -> tuple[KVCache, list[int]]:
    """A batch-1 `KVCache` holding `pieces` (`Cached` / `Fresh`, in sequence order) at their global positions, and
    the token ids of the whole sequence. Fresh pieces run in one forward (see the module docstring)."""
    plan = check_plan(model)
    cfg = text_config(model)
    window = window_of(model)
    cached, fresh_ids, fresh_pos, total, seq = _place(pieces, len(plan))
    ropes = [rope_for_layer(cfg, i) for i in range(len(plan))]
    entries = [_cached_entries(cached, i, ropes[i]) for i in range(len(plan))] if cached else None
    if not fresh_ids:
        layers = [_full_layer(*entries[i], total, reserve) if kind == FULL
                  else _sliding_final(window, *entries[i], total) for i, kind in enumerate(plan)]
        return KVCache.from_layers(model, layers, reserve), seq

    enable_kvforge_attention(model)  # the assembly layers carry slots: only kvforge's attention reads them
    device = next(model.parameters()).device
    f = len(fresh_ids)
    assembly = []
    for i in range(len(plan)):
        if entries is None:  # nothing cached at all: an empty layer
            assembly.append(DenseLayer(reserve=f + reserve))
            continue
        keys, values, pos, valid = entries[i]
        kind = HeadVarlenLayer if valid is not None else DenseLayer
        assembly.append(kind.from_entries(keys, values, pos, valid, logical=total, reserve=f + reserve))
    cache = KVCache.from_layers(model, assembly, reserve)
    qpos = torch.tensor(fresh_pos, device=device)
    kpos = torch.cat([torch.arange(total, device=device), qpos])  # slot s < S is position s; fresh i sits at S + i
    allowed = (kpos[None, :] <= qpos[:, None])[None, None]
    if entries is None:  # an empty layer gives fresh tokens slots 0.. instead of S..
        kpos, allowed = qpos, (qpos[None, :] <= qpos[:, None])[None, None]
    model(input_ids=torch.tensor([fresh_ids], device=device), position_ids=qpos[None],
          attention_mask=layer_masks(model, qpos, kpos, allowed), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    layers = []
    for i, kind in enumerate(plan):
        keys, values, slots, valid = cache.layers[i].entries()
        keys, values, pos, valid = _compact(keys, values, kpos[slots], None if bool(valid.all()) else valid)
        layers.append(_full_layer(keys, values, pos, valid, total, reserve) if kind == FULL
                      else _sliding_final(window, keys, values, pos, valid, total))
    return KVCache.from_layers(model, layers, reserve), seq
