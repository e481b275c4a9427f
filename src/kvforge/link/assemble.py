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


@dataclass
class Side:
    """One layer's cached entries side by side: keys `[1, H, N, Dk]` (re-rotated to their global positions), values
    `[1, H, N, Dv]`, positions and validity (`[1, H, N]`, or None when all valid). Plain layers (every head holds
    every entry: uncompressed documents) carry their positions once, on the host (`host [N]`), so no decision about
    them needs the device; `pos` is then `[N]` on the device."""

    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor | None = None
    host: torch.Tensor | None = None


def _ropes(cfg, plan: list[str], device) -> list:
    """The RoPE of each layer, computed once per layer type (Gemma 3 has two), on `device`."""
    types = getattr(cfg, "layer_types", None) or [None] * len(plan)
    by_type: dict = {}
    for i, t in enumerate(types):
        if t not in by_type:
            by_type[t] = rope_for_layer(cfg, i, device=device)
    return [by_type[t] for t in types]


def _general(cached: list, layer_idx: int, rope) -> Side:
    """Any layer (press-compressed documents: per-entry slots, per-head validity), one layer at a time."""
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
    return Side(*_compact(keys, values, slots, None if bool(valid.all()) else valid))


def _side_by_side(cached: list, layer_ids: list[int], rope, device) -> list[Side]:
    """The cached entries of the layers `layer_ids` (one kind, one RoPE). Plain layers of equal shapes are stacked and
    rotated together — a handful of kernels for all of them instead of a set per layer and document."""
    docs = [p.doc for p, _ in cached]
    plain = all(d.layers[i].slots is None and d.layers[i].valid is None and
                d.layers[i].keys.shape == d.layers[layer_ids[0]].keys.shape for d in docs for i in layer_ids)
    if not plain:
        return [_general(cached, i, rope) for i in layer_ids]
    keys, values, host, delta = [], [], [], []
    for piece, offset in cached:
        first = piece.doc.layers[layer_ids[0]]
        start, n = offset - piece.drop, first.keys.shape[2]  # start: where the document's position 0 goes
        skip = min(max(piece.drop - first.start, 0), n)  # entries of recomputed tokens
        keys.append(torch.stack([piece.doc.layers[i].keys[0, :, skip:] for i in layer_ids]))
        values.append(torch.stack([piece.doc.layers[i].values[0, :, skip:] for i in layer_ids]))
        host.append(torch.arange(first.start + skip, first.start + n) + start)
        delta.append(torch.full((n - skip,), start))
    host = torch.cat(host)
    k = rotate(torch.cat(keys, 2), torch.cat(delta).to(device), rope)  # [G, H, N, Dk]
    v = torch.cat(values, 2)
    pos = host.to(device)
    return [Side(k[g : g + 1], v[g : g + 1], pos, None, host) for g in range(len(layer_ids))]


def _full_layer(side: Side, total: int, reserve: int, order: torch.Tensor | None = None) -> DenseLayer:
    """A full-attention layer of `side`'s entries. Plain: contiguous, taking entries in `order` (positions 0..total−1;
    None: already in order). Otherwise with slots (and validity), or contiguous when the device says it may be."""
    if side.host is not None:
        keys, values = (side.keys, side.values) if order is None else (side.keys[:, :, order], side.values[:, :, order])
        return DenseLayer.from_entries(keys, values, reserve=reserve)
    keys, values, pos, valid = side.keys, side.values, side.pos, side.valid
    if valid is None:
        order = pos[0, 0].argsort()
        if bool((pos == pos[:, :1]).all()) and bool((pos[0, 0, order] == torch.arange(total, device=pos.device)).all()):
            return DenseLayer.from_entries(keys[:, :, order], values[:, :, order], reserve=reserve)
        return DenseLayer.from_entries(keys, values, pos, logical=total, reserve=reserve)
    return HeadVarlenLayer.from_entries(keys, values, pos, valid, logical=total, reserve=reserve)


def _sliding_final(window: int, side: Side, total: int, order: torch.Tensor | None = None) -> DynamicSlidingWindowLayer:
    """The last `window − 1` positions, in order: every earlier one is outside any later token's window. Plain
    sides give the order on the host (`order`: the entries in position order, or None when they already are)."""
    if side.host is None:
        keys, values, pos, valid = _compact(side.keys, side.values, side.pos, side.valid)
        if valid is not None:
            raise KVForgeError("sliding-window layers hold every token; a press cannot have removed entries there")
        row = pos[0, 0]
        order = row.argsort()
        order = order[row[order] >= total - (window - 1)]
        return sliding_layer(window, keys[:, :, order].contiguous(), values[:, :, order].contiguous(), total)
    host = side.host if order is None else side.host[order]
    keep = int((host >= total - (window - 1)).sum())  # the tail of the position order
    take = torch.arange(len(host) - keep, len(host)) if order is None else order[len(host) - keep :]
    take = take.to(side.keys.device)
    return sliding_layer(window, side.keys[:, :, take].contiguous(), side.values[:, :, take].contiguous(), total)


def _layers(model, cached: list, plan: list[str], device) -> list[Side]:
    """Every layer's cached entries, side by side (layers grouped by kind, so plain ones are stacked)."""
    ropes = _ropes(text_config(model), plan, device)
    sides: list = [None] * len(plan)
    for kind in dict.fromkeys(plan):
        ids = [i for i, k in enumerate(plan) if k == kind]
        for i, side in zip(ids, _side_by_side(cached, ids, ropes[ids[0]], device)):
            sides[i] = side
    return sides


@torch.inference_mode()
def build_cache(model, pieces: list, reserve: int = 256) -> tuple[KVCache, list[int]]:
    """A batch-1 `KVCache` holding `pieces` (`Cached` / `Fresh`, in sequence order) at their global positions, and
    the token ids of the whole sequence. Fresh pieces run in one forward (see the module docstring)."""
    plan = check_plan(model)
    window = window_of(model)
    device = next(model.parameters()).device
    cached, fresh_ids, fresh_pos, total, seq = _place(pieces, len(plan))
    sides = _layers(model, cached, plan, device) if cached else None
    if not fresh_ids:  # plain documents then cover 0..total-1 in order
        layers = [_full_layer(s, total, reserve) if kind == FULL else _sliding_final(window, s, total)
                  for s, kind in zip(sides, plan)]
        return KVCache.from_layers(model, layers, reserve), seq

    enable_kvforge_attention(model)  # the assembly layers carry slots: only kvforge's attention reads them
    f = len(fresh_ids)
    assembly = []
    for i in range(len(plan)):
        if sides is None:  # nothing cached at all: an empty layer
            assembly.append(DenseLayer(reserve=f + reserve))
            continue
        s = sides[i]
        slots = s.pos.expand(*s.keys.shape[:3]) if s.host is not None else s.pos
        kind = HeadVarlenLayer if s.valid is not None else DenseLayer
        assembly.append(kind.from_entries(s.keys, s.values, slots, s.valid, logical=total, reserve=f + reserve))
    cache = KVCache.from_layers(model, assembly, reserve)
    qpos = torch.tensor(fresh_pos, device=device)
    kpos = torch.cat([torch.arange(total, device=device), qpos])  # slot s < S is position s; fresh i sits at S + i
    allowed = (kpos[None, :] <= qpos[:, None])[None, None]
    if sides is None:  # an empty layer gives fresh tokens slots 0.. instead of S..
        kpos, allowed = qpos, (qpos[None, :] <= qpos[:, None])[None, None]
    model(input_ids=torch.tensor([fresh_ids], device=device), position_ids=qpos[None],
          attention_mask=layer_masks(model, qpos, kpos, allowed), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    layers = []
    orders: dict[str, torch.Tensor] = {}  # per kind, for plain layers: their entries (cached, then fresh) in order
    for i, kind in enumerate(plan):
        keys, values, slots, valid = cache.layers[i].entries()
        if sides is None or sides[i].host is not None:
            host = torch.cat([sides[i].host if sides is not None else torch.zeros(0, dtype=torch.long),
                              torch.tensor(fresh_pos)])
            if kind not in orders:
                orders[kind] = host.argsort()
            side = Side(keys, values, host.to(device), None, host)
            order = orders[kind]
            layers.append(_full_layer(side, total, reserve, order.to(device)) if kind == FULL
                          else _sliding_final(window, side, total, order))
            continue
        keys, values, pos, valid = _compact(keys, values, kpos[slots], None if bool(valid.all()) else valid)
        side = Side(keys, values, pos, valid)
        layers.append(_full_layer(side, total, reserve) if kind == FULL else _sliding_final(window, side, total))
    return KVCache.from_layers(model, layers, reserve), seq
