"""Cache layers: what one attention layer stores.

Every layer here reports two lengths:
- the *logical* length (`get_seq_length`): tokens the layer has seen, which drives position ids and
  how `generate()` slices the prompt;
- the *physical* length (`n`): entries actually stored after a press removed some.

Masks are built by transformers in logical slot space (`get_mask_sizes` returns the logical size);
the attention function maps them onto the stored entries through `slots` (the logical slot of each
stored entry). See docs/decisions.md, "masks in logical space".

Storage is a preallocated buffer with amortised growth, so a decode step writes one column instead of
concatenating the whole cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from kvforge.cache.bits import mask_positions, pack_bits, unpack_bits
from kvforge.errors import KVForgeError

GROWTH = 1.5  # capacity multiplier when a buffer is full


class ParkedSlots:
    """The logical slots of a pruned layer `[B, H_kv, cap]` (int64, the first `k` written), parked until read.

    A prune during a prefill makes the slots, but nothing of the prefill reads them: decoding, masks over several
    query tokens and position-aware presses do, later. Parking keeps 8 bytes per kept entry and head (67 MB for
    Llama-3.1-8B at 128k, ratio 0.75) out of the device's prefill peak; the first read brings them back (`load`,
    once: every holder of this object, e.g. a snapshot, gets the same device tensor, which is what sharing a buffer
    reference means elsewhere in a layer).

    Increasing positions below `n` (what a prefill's prune keeps) are parked as a bit mask, n/8 bytes per row and
    head (4 MB for that model, every layer): on CUDA copied without waiting into pinned host memory (a pageable
    device-to-host copy cost ~1.5 ms of host time per layer on an H200; kept on the device, the 4 MB put knorm's 128k
    prefill peak 0.01 GB above kvpress's, which keeps no positions). Other slots are copied to pageable host memory.
    """

    def __init__(self, slots: torch.Tensor, cap: int, n: int | None = None):
        self.device, self.cap, self.k, self.n = slots.device, cap, slots.shape[-1], n
        self.host = self.bits = None
        if n is None:
            self.host = slots.to("cpu", copy=True)
        else:
            mask = torch.zeros(*slots.shape[:-1], n, dtype=torch.bool, device=slots.device)
            bits = pack_bits(mask.scatter_(-1, slots, True))
            if bits.is_cuda:  # off the device too: a non-blocking copy into pinned memory, ordered on the stream
                # before the read back in `load`; the device block is free for the prefill's next kernels
                self.bits = torch.empty(bits.shape, dtype=bits.dtype, pin_memory=True).copy_(bits, non_blocking=True)
            else:
                self.bits = bits
        self.loaded: torch.Tensor | None = None

    def load(self) -> torch.Tensor:
        if self.loaded is None:
            src = self.host if self.host is not None else self.bits
            self.loaded = torch.empty(*src.shape[:-1], self.cap, dtype=torch.long, device=self.device)
            if self.host is not None:
                self.loaded[:, :, : self.k].copy_(self.host)
            else:
                bits = self.bits.to(self.device, non_blocking=True)
                self.loaded[:, :, : self.k] = mask_positions(unpack_bits(bits, self.n), self.k)
            self.host = self.bits = None
        return self.loaded


class DenseLayer(CacheLayerMixin):
    """Keys/values `[B, H_kv, cap, D]`, the first `n` columns valid; prunable to the same count per head.

    `slots` is None while the layer is contiguous (entry t holds logical slot t); after a prune it is a
    `[B, H_kv, cap]` int64 tensor giving the logical slot of each entry.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True
    compressible = True  # a full-attention layer presses act on
    rewritable = True  # replace_entries() may overwrite stored keys/values (merging presses)

    def __init__(self, reserve: int = 256, **kwargs):
        super().__init__()
        self.reserve = reserve
        self.n = 0  # physical entries
        self.logical = 0  # tokens seen
        self._slots: torch.Tensor | ParkedSlots | None = None
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        # Per-layer state of a decode-time press (H2O accumulators, Quest page bounds, ...): a dict of tensors
        # (batch first) aligned with the entries as the press sees fit. Saved by snapshot() and put back by
        # restore(); presses replace it and never write into it in place, so a snapshot's copy stays valid.
        self.press_state: dict | None = None

    @classmethod
    def from_entries(cls, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None, *, logical: int | None = None, reserve: int = 256):
        """The one way to build a layer holding given entries: keys `[B, H_kv, n, Dk]`, values `[B, H_kv, n, Dv]`,
        logical slots `[B, H_kv, n]` (default: entry t is slot t), validity `[B, H_kv, n]` (default: all valid;
        only per-head kinds accept invalid entries), `logical` tokens seen (default: one past the largest slot),
        `reserve` spare capacity for decoding. Each kind stores them in its own layout."""
        layer = cls(reserve=reserve)
        layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        b, h, n = keys.shape[:3]
        if logical is None:
            logical = n if slots is None or n == 0 else int(slots.max()) + 1
        layer.logical = logical
        layer._store(keys, values, slots, valid)
        return layer

    def _store(self, keys, values, slots, valid) -> None:
        if valid is not None and not bool(valid.all()):
            raise ValueError(f"{type(self).__name__} stores every entry of every head; invalid entries need a "
                             "per-head layer kind")
        b, h, n = keys.shape[:3]
        if slots is None:
            self._alloc(b, h, keys.shape[3], values.shape[3], n + self.reserve)
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self.n = n
            self._sync_views()
        else:
            self._replace(keys, values, slots)

    @property
    def slots(self) -> torch.Tensor | None:
        """`[B, H_kv, cap]` int64 logical slot of each entry once pruned, else None (parked ones come back here)."""
        if isinstance(self._slots, ParkedSlots):
            self._slots = self._slots.load()
        return self._slots

    @slots.setter
    def slots(self, value: torch.Tensor | None) -> None:
        self._slots = value

    # -- storage -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._alloc(key_states.shape[0], key_states.shape[1], key_states.shape[-1], value_states.shape[-1],
                    key_states.shape[-2] + self.reserve)
        self.is_initialized = True

    def _alloc(self, b: int, h: int, dk: int, dv: int, cap: int) -> None:
        self._k = torch.empty(b, h, cap, dk, dtype=self.dtype, device=self.device)
        self._v = torch.empty(b, h, cap, dv, dtype=self.dtype, device=self.device)

    @property
    def storage(self) -> torch.Tensor | None:
        """The key buffer, for identity only: a new object whenever the stored entries are replaced (pruning,
        merging), the same one while decoding appends; None for packed per-head storage. Memos of scores key on
        it."""
        return self._k

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def _ensure(self, extra: int) -> None:
        need = self.n + extra
        if need <= self.capacity:
            return
        cap = max(need, int(self.capacity * GROWTH) + 16)
        k, v = self._k, self._v
        self._alloc(k.shape[0], k.shape[1], k.shape[3], v.shape[3], cap)
        self._k[:, :, : self.n] = k[:, :, : self.n]
        self._v[:, :, : self.n] = v[:, :, : self.n]
        self._grow_extra(cap)

    def _grow_extra(self, cap: int) -> None:
        if self.slots is not None:
            s = self.slots
            self.slots = s.new_empty(s.shape[0], s.shape[1], cap)
            self.slots[:, :, : self.n] = s[:, :, : self.n]

    def length_tensors(self) -> list[torch.Tensor]:
        """The buffers whose axis 2 is the layer's capacity (keys, values, and slots once pruned)."""
        return [t for t in (self._k, self._v, self.slots) if t is not None]

    def _sync_views(self) -> None:
        self.keys = self._k[:, :, : self.n]
        self.values = self._v[:, :, : self.n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.graph is not None:
            return self.graph_update(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self._ensure(q)
        self._k[:, :, self.n : self.n + q] = key_states
        self._v[:, :, self.n : self.n + q] = value_states
        self._append_extra(q)
        self.n += q
        self.logical += q
        self._sync_views()
        return self.keys, self.values

    # -- graph mode: one-token steps whose write position and lengths live on the device, so a whole decode
    # step can be captured in a CUDA graph (kvforge.cache.graphs.GraphDecoder). Host counters advance via advance().
    graph: dict | None = None

    def enter_graph_mode(self, steps: int) -> None:
        if self.n + steps > self.capacity:
            raise ValueError(f"graph decoding of {steps} steps needs capacity {self.n + steps}, have {self.capacity}")
        if isinstance(self._slots, ParkedSlots):  # back on the device before a step is captured
            self._slots = self._slots.load()
        b, h = self._k.shape[:2]
        dev = self._k.device
        self.graph = {
            "pos": torch.tensor([self.n], device=dev),
            "logical": torch.tensor([self.logical], device=dev),
            "lengths": torch.full((b * h,), self.n, dtype=torch.int32, device=dev),
            "offsets": torch.arange(b * h, device=dev, dtype=torch.int64) * self.capacity,
            "limit": self.logical + steps,  # the logical length after the last graph step (get_mask_sizes)
        }

    def graph_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        g = self.graph
        q = key_states.shape[2]
        at, slot = g["pos"], g["logical"]  # one token: the counters themselves (no extra kernel per decode step)
        if q > 1:
            step = torch.arange(q, device=at.device)
            at, slot = at + step, slot + step
        self._k.index_copy_(2, at, key_states)
        self._v.index_copy_(2, at, value_states)
        if self.slots is not None:
            self.slots.index_copy_(2, at, slot.expand(*self.slots.shape[:2], q))
        g["pos"] += q
        g["logical"] += q
        g["lengths"] += q
        return self._k, self._v

    def graph_window(self, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Graph mode, a step of q > 1 tokens (after its update): (keys `[B, H_kv, cap, Dk]`, values, mask
        `[1, 1, q, cap]`): new token i sees every entry before it and itself, by the device-side length."""
        cap = self._k.shape[2]
        first = self.graph["pos"] - q  # where this step's first token was written
        seen = first + 1 + torch.arange(q, device=first.device)
        return self._k, self._v, (torch.arange(cap, device=first.device)[None, :] < seen[:, None])[None, None]

    def zero_spare_(self) -> None:
        """Zero the buffers past the stored entries: slots a graph-mode step masks must still hold finite numbers
        (a masked NaN would poison the softmax)."""
        self._k[:, :, self.n :].zero_()
        self._v[:, :, self.n :].zero_()

    def load_(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the entries with keys `[B, H_kv, n, Dk]`, values `[B, H_kv, n, Dv]` (entry t = slot t) in the
        same buffers, which a captured step keeps pointing at (`GraphForward`); the capacity does not change."""
        b, h, n = keys.shape[:3]
        if self._k is None or keys.shape[:2] != self._k.shape[:2] or n > self.capacity:
            have = None if self._k is None else f"{tuple(self._k.shape[:2])} with room for {self.capacity}"
            raise KVForgeError(f"load_: {n} entries of {tuple(keys.shape[:2])} do not fit this layer ({have})")
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self.n = self.logical = n
        if self.slots is not None:
            self.slots[:, :, :n] = torch.arange(n, device=self.slots.device)
        self._sync_views()

    def graph_segments(self):
        """(k_flat, v_flat, offsets, lengths, max_len, total) for the decode kernel in graph mode."""
        b, h, cap = self._k.shape[:3]
        g = self.graph
        return (self._k.view(b * h * cap, -1), self._v.view(b * h * cap, -1), g["offsets"], g["lengths"], cap,
                b * h * cap)

    def advance(self, q: int = 1) -> None:
        """Host bookkeeping after a graph step wrote q tokens on the device."""
        self.n += q
        self.logical += q
        self._sync_views()

    def exit_graph_mode(self) -> None:
        self.graph = None

    def _append_extra(self, q: int) -> None:
        if self.slots is not None:
            new = torch.arange(self.logical, self.logical + q, device=self.slots.device)
            self.slots[:, :, self.n : self.n + q] = new

    # -- lengths ---------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.logical

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.graph is not None:  # graph mode: a constant, like a static cache's capacity (see KVCache)
            return self.graph["limit"], 0
        return self.logical + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def entry_slots(self) -> torch.Tensor | None:
        """Logical slot of each stored entry `[B, H_kv, n]`, or None when entry t is slot t."""
        return None if self.slots is None else self.slots[:, :, : self.n]

    def entry_valid(self) -> torch.Tensor | None:
        """`[B, H_kv, n]` bool, or None when every stored entry is valid."""
        return None

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys `[B, H_kv, n, Dk]` and values `[B, H_kv, n, Dv]` of every stored entry, whatever the layer kind
        (a padded block for per-head layouts, see `entry_valid`; decoded codes for coded layers). Read only."""
        return self.keys, self.values

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`kv()` plus logical slots `[B, H_kv, n]` (int64) and validity `[B, H_kv, n]` (bool; the padding of
        per-head layouts is False), as tensors whatever the layer kind. Read only."""
        keys, values = self.kv()
        b, h, n = keys.shape[:3]
        slots = self.entry_slots()
        slots = torch.arange(n, device=keys.device).expand(b, h, n) if slots is None else slots
        valid = self.entry_valid()
        valid = torch.ones(b, h, n, dtype=torch.bool, device=keys.device) if valid is None else valid
        return keys, values, slots, valid

    # -- pruning ---------------------------------------------------------------------------------
    def _full_slots(self) -> torch.Tensor:
        if self.slots is not None:
            return self.slots[:, :, : self.n]
        b, h = self._k.shape[:2]
        return torch.arange(self.n, device=self.device).expand(b, h, self.n)

    def _gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and slots of the entries at physical positions `indices [B, H_kv, k]` (new tensors)."""
        b, h, k = indices.shape
        keys = self._k[:, :, : self.n].gather(2, indices[..., None].expand(b, h, k, self._k.shape[3]))
        values = self._v[:, :, : self.n].gather(2, indices[..., None].expand(b, h, k, self._v.shape[3]))
        return keys, values, self._full_slots().gather(2, indices)

    def keep(self, indices: torch.Tensor, increasing: bool = False) -> None:
        """Keep the entries at `indices` `[B, H_kv, k]` (physical positions), in that order; free the rest.
        `increasing`: the caller guarantees strictly increasing positions per row (a prefill's prune parks them in
        bits, `ParkedSlots`).

        The kept entries are gathered straight into the new buffers (no gathered copy beside them): while a layer is
        compressed its memory is the full-length entries plus the kept ones, as in kvpress."""
        b, h, k = indices.shape
        contiguous = self._slots is None
        old_k, old_v = self._k[:, :, : self.n], self._v[:, :, : self.n]
        old_slots = None if contiguous else self._full_slots()
        self.n = 0
        self._alloc(b, h, old_k.shape[3], old_v.shape[3], k + self.reserve)
        torch.gather(old_k, 2, indices[..., None].expand(b, h, k, old_k.shape[3]), out=self._k[:, :, :k])
        torch.gather(old_v, 2, indices[..., None].expand(b, h, k, old_v.shape[3]), out=self._v[:, :, :k])
        if contiguous:  # a prefill's prune: the slots are the kept positions; nothing reads them before decoding
            self.slots = ParkedSlots(indices, k + self.reserve, old_k.shape[2] if increasing else None)
        else:
            self.slots = old_slots.new_empty(b, h, k + self.reserve)
            torch.gather(old_slots, 2, indices, out=self.slots[:, :, :k])
        self.n = k
        self._sync_views()

    # The key buffer when this layer alone holds its buffers, so `compact` may move entries inside them: set only by
    # `compact` right after it allocated them, cleared by `snapshot()`, `restore()` and `release()` (a fork).
    _private: torch.Tensor | None = None

    def compact(self, indices: torch.Tensor, start: int = 0) -> None:
        """`keep(indices)` for increasing positions `indices [B, H_kv, k]` (a subsequence of the stored entries) whose
        first `start` are `0 .. start-1` (nothing dropped before `start`), moving only the entries from `start` on.

        The same entries, slots and lengths as `keep`. The first call allocates new buffers as `keep` does (snapshots
        and forks keep the old ones); later calls, until the next `snapshot()`/`restore()`/`release()`, move the
        entries inside those private buffers: a decode-time press that drops an entry per token then neither
        allocates nor copies the whole layer per step. The buffer identity (`storage`) is kept then: score memos are
        read by prefill compression only, never on a buffer this allocated."""
        if self._private is None or self._private is not self._k:
            self.keep(indices)
            self._private = self._k
            return
        b, h, k = indices.shape
        if start < k:
            cap = self._k.shape[2]
            tail = indices[:, :, start:]
            rows = (tail + (torch.arange(b * h, device=tail.device) * cap).view(b, h, 1)).reshape(-1)
            for buf in (self._k, self._v):
                flat = buf.view(b * h * cap, buf.shape[3])
                buf[:, :, start:k] = flat.index_select(0, rows).view(b, h, k - start, buf.shape[3])
            self.slots[:, :, start:k] = self.slots[:, :, : self.n].gather(2, tail)
        self.n = k
        self._sync_views()

    def release(self) -> None:
        """Another holder now shares this layer's buffers (a fork): `compact` allocates again before moving entries."""
        self._private = None

    def _replace(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        b, h, k = slots.shape
        self.n = 0
        self._alloc(b, h, keys.shape[3], values.shape[3], k + self.reserve)
        self._k[:, :, :k] = keys
        self._v[:, :, :k] = values
        self.slots = slots.new_empty(b, h, k + self.reserve)
        self.slots[:, :, :k] = slots
        self.n = k
        self._sync_views()

    def replace_entries(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        """Overwrite the stored keys and/or values (`[B, H_kv, n, D]`, same entries and slots), e.g. after a
        merging press. Written into new buffers: forks and snapshots share the old ones by reference."""
        valid = self.entry_valid()
        keys = self.keys if keys is None else keys.to(self.dtype)
        values = self.values if values is None else values.to(self.dtype)
        self._replace(keys, values, self._full_slots())
        if valid is not None:  # head-varlen: validity follows the entries into the new buffers
            self.valid = valid.new_zeros(valid.shape[0], valid.shape[1], self.capacity)
            self.valid[:, :, : self.n] = valid

    # -- snapshot / restore (answering several questions from one compressed context) ----------------
    _STATE = ("n", "logical", "_k", "_v", "_slots", "press_state")

    def snapshot(self) -> tuple:
        """Lengths and buffer references. Pruning allocates new buffers and appends only write past `n`, so
        references are enough to come back here (decode-time presses included: `compact` moves entries only inside
        buffers allocated after the last snapshot)."""
        self._private = None
        return tuple(getattr(self, a) for a in self._STATE)

    def restore(self, state: tuple) -> None:
        for a, v in zip(self._STATE, state):
            setattr(self, a, v)
        self._private = None
        self._sync_views()

    # -- accounting ------------------------------------------------------------------------------
    def entry_counts(self) -> int | list[int]:
        return self.n

    def stored_bytes(self) -> int:
        if self._k is None:
            return 0
        b, h = self._k.shape[:2]
        per = (self._k.shape[3] + self._v.shape[3]) * self._k.element_size()
        return b * h * self.n * per

    def uncompressed_bytes(self) -> int:
        """What the layer would store had nothing been removed: every logical token, every head."""
        if self._k is None:
            return 0
        b, h = self._k.shape[:2]
        return b * h * self.logical * (self._k.shape[3] + self._v.shape[3]) * self._k.element_size()

    def allocated_bytes(self) -> int:
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    # -- transformers Cache API --------------------------------------------------------------------
    def reset(self) -> None:
        self.n = self.logical = 0
        self.slots = None
        self._k = self._v = self.keys = self.values = None
        self.press_state = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        drop = -tokens_to_remove
        if self._slots is not None and drop > 0:
            # entries appended after the last prune are contiguous at the end
            drop = min(drop, self.n)
        self.n -= drop
        self.logical -= drop
        self._sync_views()

    def _index_batch(self, index: torch.Tensor) -> None:
        self._k = self._k[index]
        self._v = self._v[index]
        if self.slots is not None:
            self.slots = self.slots[index]
        if self.press_state is not None:  # batch-first tensors follow the rows; anything else is kept as is
            b = self._k.shape[0]
            self.press_state = {k: v[index] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v
                                for k, v in self.press_state.items()}
        self._index_batch_extra(index)
        self._sync_views()

    def _index_batch_extra(self, index: torch.Tensor) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._index_batch(indices.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self._k.shape[0]
            self._index_batch(torch.arange(b, device=self.device).repeat_interleave(repeats))

    def offload(self):  # buffers stay where they are; views would dangle otherwise
        pass

    def prefetch(self):
        pass


class HeadVarlenLayer(DenseLayer):
    """Per-head budgets: each KV head keeps its own number of entries.

    On CPU the kept entries of each head are compacted to the front of a padded block `[B, H_kv, cap, D]`
    with a validity mask `valid [B, H_kv, cap]`; entries appended while decoding are valid for every head.
    """

    _STATE = DenseLayer._STATE + ("valid",)

    def __init__(self, reserve: int = 256, **kwargs):
        super().__init__(reserve=reserve)
        self.valid: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, layer: DenseLayer) -> HeadVarlenLayer:
        new = cls(reserve=layer.reserve)
        new.__dict__.update({k: v for k, v in layer.__dict__.items() if k != "valid"})
        new.valid = None
        layer.release()
        new.release()
        return new

    def _store(self, keys, values, slots, valid) -> None:
        b, h, n = keys.shape[:3]
        slots = torch.arange(n, device=keys.device).expand(b, h, n) if slots is None else slots
        self._replace(keys, values, slots)
        if valid is not None and not bool(valid.all()):
            self.valid = valid.new_zeros(b, h, self.capacity)
            self.valid[:, :, :n] = valid

    def block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The whole preallocated block (capacity, not `n`): keys `[B, H_kv, cap, Dk]`, values, validity
        `[B, H_kv, cap]` (None when every entry is valid). What a graph-mode step attends under its mask."""
        return self._k, self._v, self.valid

    def _grow_extra(self, cap: int) -> None:
        super()._grow_extra(cap)
        if self.valid is not None:
            v = self.valid
            self.valid = v.new_zeros(v.shape[0], v.shape[1], cap)
            self.valid[:, :, : self.n] = v[:, :, : self.n]

    def _append_extra(self, q: int) -> None:
        super()._append_extra(q)
        if self.valid is not None:
            self.valid[:, :, self.n : self.n + q] = True

    def _index_batch_extra(self, index: torch.Tensor) -> None:
        if self.valid is not None:
            self.valid = self.valid[index]

    def entry_valid(self) -> torch.Tensor | None:
        return None if self.valid is None else self.valid[:, :, : self.n]

    def enter_graph_mode(self, steps: int) -> None:
        super().enter_graph_mode(steps)
        if self.valid is not None:  # graph steps attend the whole block under `valid`: the spare room is invalid
            self.valid[:, :, self.n :] = False  # (an earlier decode, since restored, may have marked it)
            self._k[:, :, self.n :].zero_()  # and holds no NaN (0 · NaN would still poison softmax @ V)
            self._v[:, :, self.n :].zero_()

    def graph_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.valid is not None:
            self.valid.index_fill_(2, self.graph["pos"], True)
        return super().graph_update(key_states, value_states)

    def keep_mask(self, keep: torch.Tensor) -> None:
        """Keep entries where `keep [B, H_kv, n]` is True; each head may keep a different number.

        Kept entries are compacted to the front (original order preserved); the block is padded to the
        largest head's count and `valid` marks the real ones.
        """
        b, h, n = keep.shape
        old_valid = self.entry_valid()
        if old_valid is not None:
            keep = keep & old_valid
        counts = keep.sum(-1)
        kmax = int(counts.max()) if counts.numel() else 0
        # stable sort puts kept entries first, in their original order
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :kmax]
        valid = torch.arange(kmax, device=keep.device) < counts[..., None]
        self._replace(*self._gather(order))
        self.valid = valid.new_zeros(b, h, self.capacity)
        self.valid[:, :, :kmax] = valid

    def restrict(self, keep: torch.Tensor) -> None:
        """Hide entries where `keep [B, H_kv, n]` is False without freeing them ("retain" mode: masks only,
        so one prefill can serve several ratios). `stats()["bytes"]` still counts only visible entries."""
        valid = keep if self.valid is None else keep & self.entry_valid()
        self.valid = valid.new_zeros(valid.shape[0], valid.shape[1], self.capacity)
        self.valid[:, :, : self.n] = valid

    def keep(self, indices: torch.Tensor, increasing: bool = False) -> None:
        old_valid = self.entry_valid()
        super().keep(indices, increasing)
        if old_valid is not None:
            v = old_valid.gather(2, indices)
            self.valid = v.new_zeros(v.shape[0], v.shape[1], self.capacity)
            self.valid[:, :, : v.shape[2]] = v

    def entry_counts(self) -> int | list[int]:
        if self.valid is None:
            return self.n
        return self.entry_valid().sum(dim=(0, 2)).tolist()

    def stored_bytes(self) -> int:
        if self.valid is None or self._k is None:
            return super().stored_bytes()
        per = (self._k.shape[3] + self._v.shape[3]) * self._k.element_size()
        return int(self.entry_valid().sum()) * per

    def reset(self) -> None:
        super().reset()
        self.valid = None


class PackedHeadLayer(DenseLayer):
    """Per-head budgets, truly packed: each (row, KV head) segment stores its kept entries back to back in one
    flat buffer `[N, D]`, followed by its own spare room for decoding, so memory is Σ(kept + reserve), never
    the longest head times the head count. `offsets`/`lengths` `[B·H_kv]` describe the segments; the Triton
    decode kernel (`kvforge.kernels.decode`) reads them directly, and the padded view (`padded()`) serves the
    rare multi-token forwards (a question's prefill) and presses that read entries.

    Used on CUDA (or with `KVCache(..., packed=True)`, which tests use on CPU) in place of `HeadVarlenLayer`.
    """

    rewritable = False
    _STATE = ("n", "logical", "k_flat", "v_flat", "slots_flat", "offsets", "lengths", "max_len", "total", "room",
              "press_state")

    def __init__(self, reserve: int = 256, **kwargs):
        super().__init__(reserve=reserve)
        self.k_flat = self.v_flat = self.slots_flat = self.offsets = self.lengths = None
        self.max_len = self.total = self.room = 0

    @classmethod
    def from_layer(cls, layer: DenseLayer, keep: torch.Tensor) -> PackedHeadLayer:
        """Pack the entries of `layer` where `keep [B, H_kv, n]` is True (original order kept per head)."""
        keys, values, slots, valid = layer.entries()
        return cls.from_entries(keys, values, slots, keep & valid, logical=layer.logical, reserve=layer.reserve)

    def _store(self, keys, values, slots, valid) -> None:
        b, h, n = keys.shape[:3]
        slots = torch.arange(n, device=keys.device).expand(b, h, n) if slots is None else slots
        valid = torch.ones(b, h, n, dtype=torch.bool, device=keys.device) if valid is None else valid
        self._pack(valid, keys, values, slots, self.reserve)

    def _pack(self, keep, keys, values, slots, reserve: int) -> None:
        """Segment s = (row, head) holds its kept entries in order, then `reserve` spare ones, so it starts at
        offsets[s] = Σ_{s' < s} (counts[s'] + reserve). The j-th kept entry overall (in (row, head, position)
        order, as `nonzero` lists them) is entry j − Σ_{s' < s} counts[s'] of its segment s, so it goes to
        j + s·reserve: no per-position scan of the mask (a cumsum over B·H_kv·n)."""
        b, h, _ = keep.shape
        counts = keep.sum(-1).flatten()
        seg_ids = torch.arange(b * h, device=keep.device)
        offsets = torch.cumsum(counts, 0) - counts + seg_ids * reserve
        bi, hi, ti = keep.nonzero(as_tuple=True)
        kept = bi.numel()  # known on the host once nonzero has returned
        max_len = int(counts.max())  # read now, while the device has caught up: read after the gathers below, it
        # made the host wait for them too, and the device then idled until the next layer's work was launched
        total_cap = kept + b * h * reserve
        dest = torch.arange(kept, device=keep.device) + (bi * h + hi) * reserve
        # zeros, not empty: padded() exposes spare room, and a masked NaN value still poisons softmax @ V
        self.k_flat = keys.new_zeros(max(total_cap, 1), keys.shape[-1])
        self.v_flat = values.new_zeros(max(total_cap, 1), values.shape[-1])
        self.slots_flat = slots.new_empty(max(total_cap, 1))
        self.k_flat.index_copy_(0, dest, keys[bi, hi, ti])
        self.v_flat.index_copy_(0, dest, values[bi, hi, ti])
        self.slots_flat.index_copy_(0, dest, slots[bi, hi, ti])
        self.offsets, self.lengths = offsets, counts.to(torch.int32)
        self.batch, self.heads = b, h
        self.max_len, self.total, self.room = max_len, kept, reserve
        self.n = self.max_len
        self._k = self._v = self.slots = None

    def enter_graph_mode(self, steps: int) -> None:
        if steps > self.room:
            raise ValueError(f"graph decoding of {steps} steps needs {steps} spare entries per head, have {self.room}")
        self.lengths = self.lengths.clone()  # written in place from now on: snapshots keep the old tensor
        # host values the step reads are fixed here (the longest segment and the total can reach, spare room
        # included), so a traced step never sees them change
        self.graph = {"logical": torch.tensor([self.logical], device=self.k_flat.device),
                      "limit": self.logical + steps, "span": self.max_len + self.room,
                      "total": self.total + self.batch * self.heads * self.room}

    def graph_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        dest = self.offsets + self.lengths.long()
        self.k_flat.index_copy_(0, dest, key_states.reshape(-1, key_states.shape[-1]))
        self.v_flat.index_copy_(0, dest, value_states.reshape(-1, value_states.shape[-1]))
        self.slots_flat.index_copy_(0, dest, self.graph["logical"].expand(dest.shape[0]))
        self.lengths += 1
        self.graph["logical"] += 1
        return self.k_flat, self.v_flat

    def graph_segments(self):
        g = self.graph
        return self.k_flat, self.v_flat, self.offsets, self.lengths, g["span"], g["total"]

    def advance(self, q: int = 1) -> None:
        self.max_len += q
        self.n = self.max_len
        self.total += self.batch * self.heads * q
        self.room -= q
        self.logical += q

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.graph is not None:
            return self.graph_update(key_states, value_states)
        q = key_states.shape[-2]
        if q > self.room:  # repack with more spare room per segment (amortised: room doubles)
            keep = self.entry_valid()
            keys, values = self.padded()
            self._pack(keep, keys, values, self.entry_slots(), max(2 * self.reserve, q + self.reserve))
            self.reserve = self.room
        pos = (self.offsets + self.lengths).view(self.batch, self.heads, 1)
        dest = (pos + torch.arange(q, device=pos.device)).flatten()
        self.k_flat[dest] = key_states.reshape(-1, key_states.shape[-1])
        self.v_flat[dest] = value_states.reshape(-1, value_states.shape[-1])
        self.slots_flat[dest] = torch.arange(self.logical, self.logical + q, device=pos.device).repeat(
            self.batch * self.heads
        )
        self.lengths = self.lengths + q
        self.max_len += q
        self.n = self.max_len
        self.total += self.batch * self.heads * q
        self.room -= q
        self.logical += q
        return self.k_flat, self.v_flat

    def _sync_views(self) -> None:  # no dense views: readers use padded()
        self.keys = self.values = None

    def _gather_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        ar = torch.arange(self.max_len, device=self.offsets.device)
        valid = ar[None, :] < self.lengths[:, None]
        idx = (self.offsets[:, None] + ar[None, :]).clamp(max=self.k_flat.shape[0] - 1)
        return idx, valid

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as a padded block `[B, H_kv, max_len, D]` (see `entry_valid` for the real ones)."""
        idx, _ = self._gather_index()
        shape = (self.batch, self.heads, self.max_len)
        return self.k_flat[idx].view(*shape, -1), self.v_flat[idx].view(*shape, -1)

    kv = padded

    def entry_slots(self) -> torch.Tensor:
        idx, valid = self._gather_index()
        slots = torch.where(valid, self.slots_flat[idx], 0)  # padding positions hold no slot
        return slots.view(self.batch, self.heads, self.max_len)

    def entry_valid(self) -> torch.Tensor:
        _, valid = self._gather_index()
        return valid.view(self.batch, self.heads, self.max_len)

    def _full_slots(self) -> torch.Tensor:
        return self.entry_slots()

    def snapshot(self) -> tuple:
        return tuple(getattr(self, a) for a in self._STATE)  # `lengths` is replaced, never written in place

    def entry_counts(self) -> list[int]:
        return self.lengths.view(self.batch, self.heads).sum(0).tolist()

    def stored_bytes(self) -> int:
        return self.total * (self.k_flat.shape[-1] + self.v_flat.shape[-1]) * self.k_flat.element_size()

    def allocated_bytes(self) -> int:
        return (self.k_flat.numel() + self.v_flat.numel()) * self.k_flat.element_size()

    def uncompressed_bytes(self) -> int:
        per = (self.k_flat.shape[-1] + self.v_flat.shape[-1]) * self.k_flat.element_size()
        return self.batch * self.heads * self.logical * per

    def keep_mask(self, keep: torch.Tensor) -> None:
        keys, values = self.padded()
        self._pack(keep & self.entry_valid(), keys, values, self.entry_slots(), self.room)

    def keep(self, indices: torch.Tensor, increasing: bool = False) -> None:
        keep = torch.zeros(self.batch, self.heads, self.max_len, dtype=torch.bool, device=indices.device)
        keep.scatter_(2, indices, True)
        self.keep_mask(keep)

    def _index_batch(self, index: torch.Tensor) -> None:  # pragma: no cover - beam search on packed heads
        raise NotImplementedError("beam search / batch reordering is not supported on packed head-varlen layers")

    def crop(self, tokens_to_remove: int) -> None:  # pragma: no cover
        raise NotImplementedError("crop is not supported on packed head-varlen layers")
