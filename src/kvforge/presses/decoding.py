"""DecodingPress: re-compress the cache every N decoding steps with any scorer press (kvpress's `DecodingPress`).

kvpress (NVIDIA), `kvpress/presses/decoding_press.py`; the method has no paper of its own (kvpress paper:
https://arxiv.org/abs/2510.00636). Defaults from kvpress: `compression_interval` 512, `target_size` 2048,
`query_buffer_size` 256 (kvpress buffers hidden states; we buffer the queries, which is what our scorers read).

This module also holds the helpers every decode-time press shares (H2O, TOVA, Scissorhands): the attention of
some of this forward's queries, per-row budgets, eviction that keeps a batch row equal to the row alone, and
the per-layer state (`layer.press_state`, saved and restored with the layer's snapshot, so a second question
starts from the state the first one started from).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.cache.layers import DenseLayer, HeadVarlenLayer
from kvforge.presses.base import LayerContext, Press, check_int, descending_rank, keep_count, select_mask
from kvforge.presses.registry import register, resolve_scorer

PREFILL_CHUNK = 512  # query rows per block when a press needs the attention of every prefill query


# -- shared helpers ------------------------------------------------------------------------------------------
def attention_probs(ctx: LayerContext, rows: slice) -> torch.Tensor:
    """Softmax attention of this forward's query rows `rows` over every stored entry, float32, `[B, H_kv, G, r, n]`
    (0 where an entry is invisible: padding, causality, invalid slots)."""
    b, hq, q, d = ctx.query.shape
    h = ctx.keys.shape[1]
    start, stop, _ = rows.indices(q)
    qr = ctx.query[:, :, start:stop].float().reshape(b, h, hq // h, stop - start, d)
    logits = torch.einsum("bhgrd,bhnd->bhgrn", qr, ctx.keys.float()) * ctx.scaling
    if not (start == q - 1 and ctx.all_real):  # the newest query over all-real entries sees every one: no mask
        mask = ctx.mask(slice(start, stop))  # [B, 1 | H, r, n]
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def new_query_valid(ctx: LayerContext) -> torch.Tensor:
    """`[B, q]` bool: which of this forward's queries are real tokens (not padding). The q new entries are the
    last q stored ones (the attention function runs presses right after `update()`)."""
    q, n = ctx.query.shape[2], ctx.keys.shape[2]
    return ctx.real[:, 0, n - q :]


def recent_mask(ctx: LayerContext, window: torch.Tensor) -> torch.Tensor:
    """`[B, H_kv, n]` bool: the last `window[b]` real entries of each row and head (entries are stored in
    token order: prunes keep order, decoding appends)."""
    if ctx.all_real:
        return ctx.token_index >= ctx.keys.shape[2] - window[:, None, None]
    n_real = ctx.real.sum(-1, keepdim=True)  # [B, H, 1]
    return ctx.real & (ctx.token_index >= n_real - window[:, None, None])


def row_budget(n_real: torch.Tensor, compression_ratio: float | None, budget: int | None) -> torch.Tensor:
    """Entries each row may hold during decoding `[B]`: `budget` when given (a short row grows up to it), else
    `(1 − compression_ratio) ×` the row's real entries at the prefill (kvpress's rounding)."""
    if budget is not None:
        return torch.full_like(n_real, budget)
    return keep_count(n_real, compression_ratio, None)


def host_read(t: torch.Tensor) -> list:
    """`t.tolist()`: the decode-time presses read the device back only through this (tests count the calls; a read
    stalls the launch queue on a GPU)."""
    return t.tolist()


def host_budget(ctx: LayerContext, compression_ratio: float | None, budget: int | None, n: int | None = None):
    """`row_budget` of every row as one host int, when it is known without reading the device: every entry is real
    (`LayerContext.all_real`), so every row holds `n` (default: the stored entries) and gets the same budget (the
    same arithmetic: `int(n · (1 − ratio))` in double precision, truncated). None otherwise."""
    if not ctx.all_real:
        return None
    if budget is not None:
        return budget
    n = ctx.keys.shape[2] if n is None else n
    return int(n * (1.0 - compression_ratio))


def uniform(ctx: LayerContext) -> bool:
    """True when a press may decide on the host: a plain dense layer whose entries are all real, so every (row,
    head) holds `n` entries and `keep_top(…, k)` with one k for every row keeps exactly min(k, n) of each."""
    return ctx.all_real and type(ctx.layer) is DenseLayer


def get_state(ctx: LayerContext) -> dict | None:
    return getattr(ctx.layer, "press_state", None)


def set_state(ctx: LayerContext, state: dict) -> None:
    ctx.layer.press_state = state


def extend(t: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    """Pad (or cut) the entry axis (dim 2) of per-entry state `t [B, H, m, ...]` to n entries, as a new tensor."""
    m = t.shape[2]
    if m >= n:
        return t[:, :, :n]
    pad = t.new_full((*t.shape[:2], n - m, *t.shape[3:]), value)
    return torch.cat([t, pad], dim=2)


def keep_top(scores: torch.Tensor, real: torch.Tensor, k: torch.Tensor, protect: torch.Tensor | None = None,
             all_real: bool = False):
    """`[B, H, n]` bool: the `k[b]` best real entries per row and head; `protect`ed entries first. `all_real`: the
    caller knows every entry is real (`LayerContext.all_real`), so `real` masks nothing and is not applied."""
    if all_real:
        s = scores.float()
        if protect is not None:
            s = s.masked_fill(protect, float("inf"))
        return descending_rank(s) < k[:, None, None]
    s = scores.float().masked_fill(~real, float("-inf"))
    if protect is not None:
        s = s.masked_fill(protect & real, float("inf"))
    return (descending_rank(s) < k[:, None, None]) & real


def keep_top_uniform(scores: torch.Tensor, k: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """`keep_top(scores, real, k, protect, all_real=True)` with one host k for every row (`uniform`): `[B, H, n]`
    bool. A decoded token over the budget (k = n − 1) drops only the lowest-scored entry, the last of equal lowest
    ones (the stable order's last), found in O(n) without a sort; other k go through `keep_top`. Scores must not be
    NaN (attention-derived ones never are)."""
    b, h, n = scores.shape
    if k != n - 1:
        return keep_top(scores, None, torch.full((b,), k, device=scores.device), protect, all_real=True)
    s = scores.float()
    if protect is not None:
        s = s.masked_fill(protect, float("inf"))
    position = torch.arange(n, device=s.device)
    last_lowest = torch.where(s == s.amin(-1, keepdim=True), position, -1).amax(-1, keepdim=True)
    return position != last_lowest


def evict(ctx: LayerContext, keep: torch.Tensor, entries: dict | None = None, width: int | None = None) -> dict:
    """Keep the entries where `keep [B, H_kv, n]` (real entries only) and return `entries` (per-entry state
    tensors `[B, H_kv, n, ...]`) gathered like the entries; a no-op when nothing real is dropped.

    Every (row, head) keeps its entries in order, filled up to the widest one with its own invisible entries
    (padding), as `select_topk` does, so the layer stays dense. When a row has too little padding for that
    (rows at different budgets), the layer becomes head-varlen and validity hides the filler.

    A dense layer whose (row, head)s all keep the same count (one row decoding, or rows at one budget) needs no
    filler: the kept positions in order, and the layer compacts them in place from the first dropped position on
    (`DenseLayer.compact`), the same entries as `evict_reference`, its slow twin, keeps. One host read per call
    (nothing dropped? the counts, the first dropped position), none when the caller passes `width`: it knows that
    every (row, head) keeps exactly `width` of its entries, fewer than it holds (`uniform`), and every entry moves.
    """
    entries = entries or {}
    layer = ctx.layer
    if type(layer) is not DenseLayer:
        return evict_reference(ctx, keep, entries)
    real = ctx.real
    keep = keep if ctx.all_real else keep & real
    n = keep.shape[-1]
    position = torch.arange(n, device=keep.device)
    if width is None:
        counts = keep.sum(-1)  # [B, H]
        first_drop = torch.where(keep, n, position).amin()  # entries before it stay where they are
        nothing = keep.all() if ctx.all_real else (keep | ~real).all()
        nothing, width, narrowest, start = host_read(torch.stack([nothing.long(), counts.amax(), counts.amin(),
                                                                  first_drop]))  # the one host read
        if nothing:
            return entries
        if width != narrowest:
            return _evict_with_filler(ctx, keep, entries, width)
    else:
        start = 0
    b, h = keep.shape[:2]
    target = torch.where(keep, keep.cumsum(-1) - 1, width)  # output column of each kept entry (width: discarded)
    idx = keep.new_zeros(b, h, width + 1, dtype=torch.long).scatter_(2, target, position.expand(b, h, n))
    idx = idx[:, :, :width]
    layer.compact(idx, start)
    return {k: _gather_entries(v, idx) for k, v in entries.items()}


def evict_reference(ctx: LayerContext, keep: torch.Tensor, entries: dict | None = None, width: int | None = None
                    ) -> dict:
    """`evict`'s slow twin (and its path for layers that are not plain dense): the same entries kept, written into
    new buffers (`layer.keep`), kept positions chosen by a top-k over priorities; `width` is not needed (the counts
    are read)."""
    entries = entries or {}
    real = ctx.real
    keep = keep & real
    if bool((keep | ~real).all()):
        return entries
    return _evict_with_filler(ctx, keep, entries, int(keep.sum(-1).max()))


def _evict_with_filler(ctx: LayerContext, keep: torch.Tensor, entries: dict, width: int) -> dict:
    real = ctx.real
    n = keep.shape[-1]
    layer = ctx.layer
    if type(layer) not in (DenseLayer, HeadVarlenLayer):  # e.g. packed per-head storage: follow by slots
        old_slots = _slots(layer)
        select_mask(ctx, keep)
        new_slots = _slots(ctx.layer)
        return {k: _realign(v, old_slots, new_slots, n, ctx.layer.logical) for k, v in entries.items()}
    priority = keep.to(torch.int8) * 2 + (~real).to(torch.int8)
    idx = priority.topk(width, dim=-1, sorted=False).indices.sort(-1).values
    kept = keep.gather(2, idx)
    layer.keep(idx)
    if not bool((kept | ~real.gather(2, idx)).all()):  # some filler is a real entry: hide it
        ctx.layer = ctx.cache.to_head_varlen(ctx.layer_idx)
        ctx.layer.restrict(kept)
    return {k: _gather_entries(v, idx) for k, v in entries.items()}


def _slots(layer) -> torch.Tensor:
    slots = layer.entry_slots()
    if slots is None:
        b, h = layer.keys.shape[:2]
        slots = torch.arange(layer.n, device=layer.keys.device).expand(b, h, layer.n)
    return slots


def _gather_entries(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    index = idx.reshape(*idx.shape, *([1] * (v.dim() - 3))).expand(*idx.shape, *v.shape[3:])
    return v.gather(2, index)


def _realign(v: torch.Tensor, old_slots: torch.Tensor, new_slots: torch.Tensor, n: int, logical: int):
    b, h = v.shape[:2]
    tail = v.shape[3:]
    flat = v.reshape(b, h, n, -1)
    by_slot = flat.new_zeros(b, h, logical, flat.shape[-1])
    by_slot.scatter_(2, old_slots[..., None].expand_as(flat), flat)
    out = by_slot.gather(2, new_slots[..., None].expand(*new_slots.shape, flat.shape[-1]))
    return out.reshape(b, h, new_slots.shape[2], *tail)


# -- the window of buffered queries a scorer sees during decoding -----------------------------------------------
class QueryWindowContext(LayerContext):
    """A `LayerContext` whose queries are the buffered recent queries of one layer `[B, Hq, w, D]` (oldest first)
    instead of this forward's. Query j of row b sits at logical slot `qslot[b, j]`; `qvalid[b, j]` is False for
    an empty buffer slot (rows hold different numbers of real queries). Query j sees the real entries whose slot
    is at most its own; `real` is what the newest query sees."""

    def __init__(self, base: LayerContext, queries, qvalid, qslot):
        super().__init__(base.module, base.cache, base.layer_idx, queries, None, base.scaling)
        self.qvalid, self.qslot = qvalid, qslot
        self.__dict__["real"] = base.real  # cached_property: set before anything calls mask()

    def mask(self, rows: slice | None = None) -> torch.Tensor:
        rows = rows if rows is not None else slice(0, self.query.shape[2])
        slots = _slots(self.layer)  # [B, H, n]
        qs, qv = self.qslot[:, rows], self.qvalid[:, rows]  # [B, r]
        visible = slots[:, :, None, :] <= qs[:, None, :, None]
        return self.real[:, :, None, :] & visible & qv[:, None, :, None]


def push_queries(state: dict | None, ctx: LayerContext, size: int) -> dict:
    """Append this forward's real queries to the layer's buffer; keep the last `size` real ones per row."""
    b, hq, q, d = ctx.query.shape
    valid = new_query_valid(ctx)  # [B, q]
    slot = torch.arange(ctx.layer.logical - q, ctx.layer.logical, device=valid.device).expand(b, q)
    queries = ctx.query.detach()
    if state is not None and "queries" in state:
        queries = torch.cat([state["queries"], queries], dim=2)
        valid = torch.cat([state["qvalid"], valid], dim=1)
        slot = torch.cat([state["qslot"], slot], dim=1)
    w = min(size, queries.shape[2])
    # per row, the last w valid queries, oldest first (invalid ones sort to the front and are cut)
    order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, -w:]
    queries = queries.gather(2, order[:, None, :, None].expand(b, hq, w, d))
    return {"queries": queries, "qvalid": valid.gather(1, order), "qslot": slot.gather(1, order)}


@register("decoding")
@dataclass
class DecodingPress(Press):
    """Every `compression_interval` decoded tokens, per layer, re-score every stored entry with the wrapped
    scorer `press` (a `ScorerPress` or its name; default knorm) and keep the best `target_size` per head, so
    the physical cache never holds more than `target_size + compression_interval` entries per head.

    The scorer sees a `LayerContext` whose queries `[B, Hq, w, D]` are the last `query_buffer_size` real
    queries of the layer (oldest first; seeded with the prefill's), so window scorers (snapkv) get their
    window. `compression_ratio` / `budget` compress the prefill as usual with the same scorer (default: not
    at all). `target_size` defaults to `budget` when given, else 2048 (kvpress). A forward that leaves more than
    `target_size + compression_interval` entries (a long context or question) is cut to `target_size` at once.
    """

    kind = "decode"
    paper = "https://arxiv.org/abs/2510.00636"
    press: object = field(default="knorm")
    compression_interval: int = 512
    target_size: int | None = None
    query_buffer_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        self.press = resolve_scorer(self.name, self.press)
        if self.target_size is None:
            self.target_size = self.budget if self.budget is not None else 2048
        for name in ("compression_interval", "target_size", "query_buffer_size"):
            check_int(self, name, getattr(self, name), minimum=1)

    def compress(self, ctx: LayerContext) -> None:
        state = push_queries(None, ctx, self.query_buffer_size)
        state["since"] = 0
        n_real = ctx.n_real
        k = keep_count(n_real, self.compression_ratio, self.budget)
        over = n_real > self.target_size + self.compression_interval  # the bound holds from the prefill on
        k = torch.where(over, k.clamp(max=self.target_size), k)
        if bool((k < n_real).any()):
            evict(ctx, keep_top(self.press.score(ctx), ctx.real, k, all_real=ctx.all_real))
        set_state(ctx, state)

    def on_decode(self, ctx: LayerContext) -> None:
        """After attention on a decoding forward: buffer the queries; every N tokens, re-score and cut."""
        old = get_state(ctx)
        state = push_queries(old, ctx, self.query_buffer_size)
        state["since"] = (old or {}).get("since", 0) + ctx.query.shape[2]
        due = state["since"] >= self.compression_interval
        if uniform(ctx):  # every row holds n entries: decided on the host
            n = ctx.keys.shape[2]
            if due or n > self.target_size + self.compression_interval:
                state["since"] = 0
                if n > self.target_size:
                    window = QueryWindowContext(ctx, state["queries"], state["qvalid"], state["qslot"])
                    k = torch.full((ctx.keys.shape[0],), self.target_size, device=ctx.keys.device)
                    evict(ctx, keep_top(self.press.score(window), ctx.real, k, all_real=True), width=self.target_size)
            set_state(ctx, state)
            return
        n_real = ctx.n_real
        if due or bool((n_real > self.target_size + self.compression_interval).any()):
            state["since"] = 0
            k = n_real.clamp(max=self.target_size)
            if bool((k < n_real).any()):
                window = QueryWindowContext(ctx, state["queries"], state["qvalid"], state["qslot"])
                scores = self.press.score(window)
                evict(ctx, keep_top(scores, ctx.real, k, all_real=ctx.all_real))
        set_state(ctx, state)
