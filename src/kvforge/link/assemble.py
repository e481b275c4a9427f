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

from kvforge.cache import DenseLayer, HeadVarlenLayer, KVCache, WindowLayer, layer_plan
from kvforge.config import enable_kvforge_attention, text_config
from kvforge.errors import KVForgeError
from kvforge.link.docs import DocKV
from kvforge.rope import is_nope, rope_for_layer, rotate, rotate_

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
    """A sliding-window layer (`WindowLayer`, the cache's kind) holding the last `window − 1` tokens' keys/values
    `[B, H, w, D]` of a sequence of `seen` tokens."""
    layer = WindowLayer(window)
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


def _kinds(cfg, plan: list[str]) -> list[tuple[str, bool]]:
    """Each layer's (plan kind, uses RoPE): layers of one kind are placed side by side with one RoPE (Gemma 3's two
    layer types have their own; NoPE layers have none)."""
    return [(k, not is_nope(cfg, i)) for i, k in enumerate(plan)]


def _ropes(cfg, kinds: list, device) -> list:
    """The RoPE of each layer, computed once per kind (`_kinds`), on `device`."""
    first = {k: i for i, k in reversed(list(enumerate(kinds)))}
    by_kind = {k: rope_for_layer(cfg, i, device=device) for k, i in first.items()}
    return [by_kind[k] for k in kinds]


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


def _plain_positions(cached: list, layer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For plain layers (every head holds every entry, equal shapes: uncompressed documents), the global position
    and the rotation Δ of each entry, `[N]` each, on the host; None when the layers are not plain."""
    docs = [p.doc for p, _ in cached]
    if not all(d.layers[i].slots is None and d.layers[i].valid is None and
               d.layers[i].keys.shape == d.layers[layer_ids[0]].keys.shape for d in docs for i in layer_ids):
        return None
    host, delta = [], []
    for piece, offset in cached:
        first = piece.doc.layers[layer_ids[0]]
        start, n = offset - piece.drop, first.keys.shape[2]  # start: where the document's position 0 goes
        skip = min(max(piece.drop - first.start, 0), n)  # entries of recomputed tokens
        host.append(torch.arange(first.start + skip, first.start + n) + start)
        delta.append(torch.full((n - skip,), start))
    return torch.cat(host), torch.cat(delta)


def _tail(x: torch.Tensor, skip: int) -> torch.Tensor:
    """Entries `skip:` of `x [B, H, n, D]` (x itself when skip = 0: no view op per layer and document)."""
    return x if skip == 0 else x[:, :, skip:]


def _side_by_side(cached: list, layer_ids: list[int], rope, positions: tuple | None) -> list[Side]:
    """The cached entries of the layers `layer_ids` (one kind, one RoPE). Plain layers (`positions`: host positions,
    device positions and device Δ from `_plain_positions`) are stacked and rotated together — a handful of kernels
    for all of them instead of a set per layer and document."""
    if positions is None:
        return [_general(cached, i, rope) for i in layer_ids]
    host, pos, delta = positions
    skips = [min(max(p.drop - p.doc.layers[layer_ids[0]].start, 0), p.doc.layers[layer_ids[0]].keys.shape[2])
             for p, _ in cached]  # entries of recomputed tokens
    like = cached[0][0].doc.layers[layer_ids[0]]
    h, n = like.keys.shape[1], len(host)
    k = like.keys.new_empty(len(layer_ids), h, n, like.keys.shape[3])
    v = like.values.new_empty(len(layer_ids), h, n, like.values.shape[3])
    for g, i in enumerate(layer_ids):  # one copy of each entry, straight into the stacked buffers
        torch.cat([_tail(p.doc.layers[i].keys, s) for (p, _), s in zip(cached, skips)], dim=2, out=k[g : g + 1])
        torch.cat([_tail(p.doc.layers[i].values, s) for (p, _), s in zip(cached, skips)], dim=2, out=v[g : g + 1])
    rotate_(k, delta, rope)  # [G, H, N, Dk]
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


def _sliding_final(window: int, side: Side, total: int, order: torch.Tensor | None = None,
                   order_dev: torch.Tensor | None = None) -> DynamicSlidingWindowLayer:
    """The last `window − 1` positions, in order: every earlier one is outside any later token's window. Plain
    sides are ordered on the host (`order`: the entries in position order, on the host and the device; None when
    they already are)."""
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
    n = len(host)
    if order is None:
        keys, values = side.keys[:, :, n - keep :], side.values[:, :, n - keep :]
    else:
        take = order_dev[n - keep :]
        keys, values = side.keys[:, :, take], side.values[:, :, take]
    return sliding_layer(window, keys.contiguous(), values.contiguous(), total)


@torch.inference_mode()
def build_cache(model, pieces: list, reserve: int = 256) -> tuple[KVCache, list[int]]:
    """A batch-1 `KVCache` holding `pieces` (`Cached` / `Fresh`, in sequence order) at their global positions, and
    the token ids of the whole sequence. Fresh pieces run in one forward (see the module docstring).

    Everything the host decides (positions, rotation Δs, the position order of the rebuilt layers, fresh ids) is
    computed first and copied to the device in one copy, before any kernel is launched: a copy from pageable memory
    waits for the device, so made later it would stall the host until the queued work is done."""
    plan = check_plan(model)
    window = window_of(model)
    device = next(model.parameters()).device
    cached, fresh_ids, fresh_pos, total, seq = _place(pieces, len(plan))
    kinds = _kinds(text_config(model), plan)
    groups = [[i for i, k in enumerate(kinds) if k == kind] for kind in dict.fromkeys(kinds)]
    empty = torch.zeros(0, dtype=torch.long)
    plain = [_plain_positions(cached, ids) if cached else (empty, empty) for ids in groups]
    fresh_host = torch.tensor(fresh_pos, dtype=torch.long)
    orders = [None if p is None or not fresh_ids else torch.cat([p[0], fresh_host]).argsort() for p in plain]
    parts = [t for p in plain if p is not None for t in p] + [o for o in orders if o is not None]
    parts += [fresh_host, torch.tensor(fresh_ids, dtype=torch.long)]
    moved = iter(torch.cat(parts).to(device).split([len(t) for t in parts]))
    plain_dev = [None if p is None else (p[0], next(moved), next(moved)) for p in plain]
    orders_dev = [None if o is None else next(moved) for o in orders]
    qpos, fresh_t = next(moved), next(moved)[None]

    ropes = _ropes(text_config(model), kinds, device)
    sides: list = [None] * len(plan)
    if cached:
        for ids, positions in zip(groups, plain_dev):
            for i, side in zip(ids, _side_by_side(cached, ids, ropes[ids[0]], positions)):
                sides[i] = side
    if not fresh_ids:  # plain documents then cover 0..total-1 in order
        layers = [_full_layer(s, total, reserve) if kind == FULL else _sliding_final(window, s, total)
                  for s, kind in zip(sides, plan)]
        return KVCache.from_layers(model, layers, reserve), seq

    enable_kvforge_attention(model)  # the assembly layers carry slots: only kvforge's attention reads them
    f = len(fresh_ids)
    assembly = []
    for s in sides:
        if s is None:  # nothing cached at all: an empty layer
            assembly.append(DenseLayer(reserve=f + reserve))
            continue
        slots = s.pos.expand(*s.keys.shape[:3]) if s.host is not None else s.pos
        kind = HeadVarlenLayer if s.valid is not None else DenseLayer
        assembly.append(kind.from_entries(s.keys, s.values, slots, s.valid, logical=total, reserve=f + reserve))
    cache = KVCache.from_layers(model, assembly, reserve)
    kpos = torch.cat([torch.arange(total, device=device), qpos])  # slot s < S is position s; fresh i sits at S + i
    allowed = (kpos[None, :] <= qpos[:, None])[None, None]
    if not cached:  # an empty layer gives fresh tokens slots 0.. instead of S..
        kpos, allowed = qpos, (qpos[None, :] <= qpos[:, None])[None, None]
    model(input_ids=fresh_t, position_ids=qpos[None], attention_mask=layer_masks(model, qpos, kpos, allowed),
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    layers: list = [None] * len(plan)
    for ids, p, order, order_dev in zip(groups, plain, orders, orders_dev):
        for i in ids:
            keys, values, slots, valid = cache.layers[i].entries()
            kind = plan[i]
            if p is not None:  # plain: entries are the cached ones (in `p`'s order), then the fresh ones
                host = torch.cat([p[0], fresh_host])
                side = Side(keys, values, None, None, host)
                layers[i] = (_full_layer(side, total, reserve, order_dev) if kind == FULL
                             else _sliding_final(window, side, total, order, order_dev))
                continue
            keys, values, pos, valid = _compact(keys, values, kpos[slots], None if bool(valid.all()) else valid)
            side = Side(keys, values, pos, valid)
            layers[i] = _full_layer(side, total, reserve) if kind == FULL else _sliding_final(window, side, total)
    return KVCache.from_layers(model, layers, reserve), seq
