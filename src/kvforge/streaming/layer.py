"""`SinkWindowLayer`: StreamingLLM's cache for one layer — `n_sink` first tokens plus a window of the most recent
ones, `size` entries in all, in a buffer allocated once.

Positions live inside the cache (Xiao et al., https://arxiv.org/abs/2309.17453, section 3.2): the stored entries
sit at positions 0..n-1 — sinks first, then the window in time order — and the current token at n-1. Rotary
models get this exactly: keys are stored *pre-RoPE* (the model's key is un-rotated once, at the position it was
rotated to) and rotated to their current position each time attention reads them, with cos/sin tables of positions
0..size-1 taken once from `kvforge.rope.apply`. Absolute-position models (GPT-2) have their positions baked into K
and V when they are computed: their entries are returned as stored (what KV-Align then corrects).

Storage: slots 0..S-1 hold the sinks, slots S..size-1 a ring of the window (window token j in slot S + j mod W);
a full layer overwrites the oldest window entry with the new token, so memory never grows. Full-attention layers
return the buffers as they are (attention over a set of entries does not depend on their order when nothing is
masked); sliding-window layers and KV-Align read the entries in position order (one gather), which makes the masks
transformers builds in position space — Gemma 3's sliding window over positions — right without any change.

Every row of a batch holds the same number of tokens (no padding): rows evict in lockstep.

Quantized entries (`bits` 8, 4 or 2): each entry — key (pre-RoPE on rotary models) and value — is stored as codes of
`bits` bits with a scale and a minimum per group of `group` channels (asymmetric, the value scheme of KIVI,
https://arxiv.org/abs/2402.02750, `kvforge.kernels.quantize`), written when the token comes in and decoded when
attention reads. KIVI quantizes keys per channel over groups of tokens; a ring that evicts one token at a time has no
fixed token groups, so keys here are quantized per token like values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from kvforge.cache.plan import register_layer_kind
from kvforge.config import layer_types
from kvforge.errors import KVForgeError
from kvforge.kernels.quantize import dequantize_values, quantize_values, value_group
from kvforge.rope import Rope, apply, join, layer_rope, pairs

ENTRY_BITS = (16, 8, 4, 2)  # 16: entries stored as the model computed them


def check_entry_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in ENTRY_BITS:
        raise KVForgeError(f"bits={bits!r} for the streaming cache; allowed: {', '.join(map(str, ENTRY_BITS))}")

# align(layer_idx, keys [B, H, m, Dk], values [B, H, m, Dv], shifts [m]) -> (keys, values): rewrites window entries
Align = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SinkWindowLayer(CacheLayerMixin):
    """Sinks + window of one layer. `n_sink` S ≥ 0, `size` C > S entries (the current token included), so the window
    holds W = C − S tokens. `rope`: the layer's RoPE (None for absolute-position models). `align`: optional KV-Align
    correction applied to window entries that have shifted (see `shifts`). `ordered`: always read in position order
    (needed by sliding-window layers, whose mask is built over positions).

    Lengths: `seen` tokens fed; `n` = min(seen, C) entries stored; `get_seq_length()` = min(seen, C − 1) is the
    position the next token gets, which is how transformers assigns position ids.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, n_sink: int, size: int, rope: Rope | None = None, layer_idx: int = 0,
                 align: Align | None = None, ordered: bool = True, bits: int = 16, group: int = 32):
        super().__init__()
        check_entry_bits(bits)
        self.bits, self.group = bits, group
        self.ordered = ordered  # read in position order (sliding-window layers: their mask is in position space)
        if not 0 <= n_sink < size:
            raise KVForgeError(f"cache size {size} with {n_sink} sinks; allowed: a cache size larger than the sinks")
        self.n_sink, self.size, self.window = n_sink, size, size - n_sink
        self.rope, self.layer_idx, self.align = rope, layer_idx, align
        self.seen = 0
        self._k = self._v = self._cos = self._sin = None  # buffers and rotation tables, on the first forward
        self._seen_t: torch.Tensor | None = None  # graph mode: `seen` on the device (see enter_graph_mode)
        self._fresh: tuple | None = None  # quantized: (slots, keys, values) of the current forward, exact

    # -- lengths -------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return min(self.seen, self.size)

    @property
    def evicted(self) -> int:
        """Window tokens evicted so far."""
        return max(0, self.seen - self.size)

    def get_seq_length(self) -> int:
        return min(self.seen, self.size - 1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return min(self.seen + query_length, self.size), 0

    def get_max_length(self) -> int:
        return self.size

    # -- writing -------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.bits < 16:  # codes [B, H, C, D·bits/8] + scale and minimum [B, H, C, D/g], for K and for V
            def coded(d: int) -> list[torch.Tensor]:
                groups = d // value_group(d, self.group)
                return [key_states.new_zeros(b, h, self.size, d * self.bits // 8, dtype=torch.uint8),
                        key_states.new_zeros(b, h, self.size, groups), key_states.new_zeros(b, h, self.size, groups)]
            self._kq, self._vq = coded(dk), coded(value_states.shape[-1])
        else:
            self._k = key_states.new_zeros(b, h, self.size, dk)
            self._v = value_states.new_zeros(b, h, self.size, value_states.shape[-1])
        if self.rope is not None:  # s·cos and s·sin of every position 0..C-1, from kvforge.rope itself
            basis = torch.zeros(1, 1, self.size, key_states.shape[-1], device=self.device)
            pairs(basis, self.rope)[0].fill_(1.0)  # apply() of (1, 0) pairs returns (s·cos pθ, s·sin pθ)
            table = apply(basis, torch.arange(self.size, device=self.device), self.rope)[0, 0]
            c, sn = (t.contiguous() for t in pairs(table, self.rope))  # [C, r/2]
            a2 = self.rope.attention_scaling**2
            self._cos, self._sin, self._icos, self._isin = c, sn, c / a2, -sn / a2  # R(−p)/s = (s·R(p))ᵀ / s²
            w = slice(self.n_sink, self.size)  # the window's rows twice: a wrapped ring's slots are a slice
            self._cos2, self._sin2 = torch.cat([c, c[w]]), torch.cat([sn, sn[w]])
        self.is_initialized = True

    def slot_of(self, token: int) -> int:
        """The slot token `token` is (or was) written to."""
        return token if token < self.n_sink else self.n_sink + (token - self.n_sink) % self.window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `[B, H, q, D]` new keys/values (rotated by the model at positions get_seq_length() + 0..q-1) and
        return every stored entry, keys rotated to their positions (see `read`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._seen_t is not None:
            return self._graph_update(key_states, value_states)
        q = key_states.shape[2]
        if q > 1 and self.seen + q > self.size:
            raise KVForgeError(f"{q} tokens in one forward with {self.seen} of {self.size} cache entries filled; "
                               f"allowed: at most {self.size - self.seen} (the free room), then one token at a time")
        if self.rope is not None:
            p = self.get_seq_length()
            key_states = self._turn(key_states, self._icos[p : p + q], self._isin[p : p + q])
        a = self.slot_of(self.seen)  # q > 1 never wraps: the slots are a..a+q-1
        self._write(torch.arange(a, a + q, device=self.device), key_states, value_states)
        self.seen += q
        self._expose()
        return self._read_fresh()

    def _read_fresh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`read()` in which the forward's own new entries are exact: a quantized cache stores them coded for later
        steps, but the tokens that computed them see what they computed (as a full-precision residual would)."""
        try:
            return self.read()
        finally:
            self._fresh = None

    def _expose(self) -> None:
        """`keys`/`values` for transformers' bookkeeping: the stored entries (the codes when quantized)."""
        k, v = (self._kq[0], self._vq[0]) if self.bits < 16 else (self._k, self._v)
        self.keys, self.values = k[:, :, : self.n], v[:, :, : self.n]

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's key and value `[B, H, C, D]`: the buffers themselves, or decoded from the codes (a temporary
        of one layer, so a quantized cache holds only its codes between steps)."""
        if self.bits == 16:
            return self._k, self._v
        dtype = self._kq[1].dtype
        k = dequantize_values(*self._kq, self.bits, self.group, dtype)
        v = dequantize_values(*self._vq, self.bits, self.group, dtype)
        if self._fresh is not None:  # this forward's own entries, exact (see _read_fresh)
            slots, fk, fv = self._fresh
            k.index_copy_(2, slots, fk)
            v.index_copy_(2, slots, fv)
        return k, v

    def _write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store entries `[B, H, q, D]` in `slots [q]` (quantized when `bits` < 16; the decoded buffers follow).
        The buffers hold values, never autograd history: when KV-Align trains through the cache (`kvforge.streaming.
        tune`) a stored entry is a constant of every later step."""
        keys, values = keys.detach(), values.detach()
        if self.bits == 16:
            self._k.index_copy_(2, slots, keys)
            self._v.index_copy_(2, slots, values)
            return
        for coded, x in ((self._kq, keys), (self._vq, values)):
            for buf, part in zip(coded, quantize_values(x, self.bits, self.group)):
                buf.index_copy_(2, slots, part)
        self._fresh = (slots, keys, values)

    # -- graph mode: the counters on the device, so one captured step serves every later step ---------------
    def enter_graph_mode(self) -> None:
        """Keep `seen` in a device tensor from now on: every index a step uses (the slot written, the positions of
        the slots, the order and shifts of the entries) is computed on the device from it, so a CUDA graph captured
        once replays correctly at every later step. Needs a full layer (nothing about the shapes changes from then
        on) and one token per forward. The host's `seen` is advanced by `advance()`, not by `update()` — a replay
        runs no Python."""
        if self.seen < self.size:
            raise KVForgeError(f"graph mode needs a full cache ({self.seen} of {self.size} entries filled)")
        self._seen_t = torch.tensor(self.seen, device=self.device)

    def exit_graph_mode(self) -> None:
        self._seen_t = None

    def advance(self, q: int = 1) -> None:
        """Host bookkeeping after a graph-mode step (the device counter advanced inside the step)."""
        self.seen += q

    def _graph_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if key_states.shape[2] != 1:
            raise KVForgeError(f"{key_states.shape[2]} tokens in one graph-mode forward; allowed: 1")
        if self.rope is not None:  # the new token sits at the last position, C - 1
            p = self.size - 1
            key_states = self._turn(key_states, self._icos[p : p + 1], self._isin[p : p + 1])
        slot = (self.n_sink + (self._seen_t - self.n_sink) % self.window).view(1)
        self._write(slot, key_states, value_states)
        self._seen_t += 1
        self._expose()
        return self._read_fresh()

    def _now(self) -> int | torch.Tensor:
        """Tokens fed so far, including the current forward's: the device counter in graph mode."""
        return self._seen_t if self._seen_t is not None else self.seen

    # -- reading -------------------------------------------------------------------------------------------
    def order(self) -> torch.Tensor | None:
        """Slot of each position 0..n-1 `[n]`, or None while slots and positions coincide (nothing evicted)."""
        if self._seen_t is None and self.seen <= self.size:
            return None
        s, w = self.n_sink, self.window
        oldest = self._now() - w - s  # window index of the oldest window token still stored
        ring = s + (oldest + torch.arange(w, device=self.device)) % w
        return torch.cat([torch.arange(s, device=self.device), ring])

    def slot_positions(self) -> torch.Tensor:
        """Position of each slot `[C]` once the ring has wrapped (the inverse of `order()`)."""
        s, w = self.n_sink, self.window
        slot = torch.arange(self.size, device=self.device)
        return torch.where(slot < s, slot, s + (slot - s - (self._now() - w - s)) % w)

    def shifts(self) -> torch.Tensor:
        """How far each entry (in position order) has moved since it was computed `[n]` (int64): the position the
        model gave it minus its position now. It is also the number of tokens it attended to that have been evicted
        since. 0 for sinks, for the newest entry and while nothing has been evicted; W−1 for the oldest window entry
        of a layer that has been full for W steps."""
        i = torch.arange(self.n, device=self.device)
        evicted = self.evicted if self._seen_t is None else self._seen_t - self.size
        token = torch.where(i < self.n_sink, i, i + evicted)  # token index at position i
        made = token.clamp(max=self.size - 1)  # the position the model gave it
        return torch.where(i < self.n_sink, 0, made - i)

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored entries in position order, as stored: keys `[B, H, n, Dk]` (pre-RoPE on rotary models), values
        `[B, H, n, Dv]`. What KV-Align reads."""
        order, (k, v) = self.order(), self._buffers()
        if order is None:
            return k[:, :, : self.n], v[:, :, : self.n]
        return k.index_select(2, order), v.index_select(2, order)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention sees: the entries with keys rotated to their positions on rotary models. In position order
        when a sliding-window mask or KV-Align needs it (`raw()`, with the correction on shifted entries);
        otherwise in slot order — the buffers themselves, no copy — since attention over a set of entries does not
        depend on their order when nothing is masked (one query token at the last position)."""
        if not self.ordered and self.align is None:
            keys, values = (t[:, :, : self.n] for t in self._buffers())
            if self.rope is not None:
                keys = self._turn(keys, *self.slot_tables())
            return keys, values
        keys, values = self.raw()
        if self.align is not None and (self.evicted or self._seen_t is not None):  # raw() gathered fresh tensors
            s, e = self.n_sink, self.n - 1  # every window entry but the newest has shifted
            keys[:, :, s:e], values[:, :, s:e] = self.align(self.layer_idx, keys[:, :, s:e], values[:, :, s:e],
                                                            self.shifts()[s:e])
        if self.rope is not None:
            keys = self._turn(keys, self._cos[: self.n], self._sin[: self.n])
        return keys, values

    def slot_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """s·cos and s·sin of each slot's position `[n, r/2]` (views while nothing is evicted)."""
        if self._seen_t is not None:  # graph mode: gathered by positions computed on the device
            pos = self.slot_positions()
            return self._cos.index_select(0, pos), self._sin.index_select(0, pos)
        if self.seen <= self.size:
            return self._cos[: self.n], self._sin[: self.n]
        s, w = self.n_sink, self.window
        at = s + w - (self.seen - self.size) % w  # ring slot k sits at position s + (k − oldest) mod w
        return (torch.cat([self._cos2[:s], self._cos2[at : at + w]]),
                torch.cat([self._sin2[:s], self._sin2[at : at + w]]))

    def _turn(self, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x `[B, H, n, D]` with each entry's rotated channel pairs (`kvforge.rope.pairs`, m of them) turned by the
        tables c, s `[n, m]` (s·cos and s·sin of its position, or the inverse tables): `kvforge.rope.apply`'s numbers
        in fewer operations (this runs for every layer at every step); channels past 2·m unchanged."""
        r = self.rope.rotary_dim
        x1, x2 = pairs(x, self.rope)
        if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):  # (out= is not differentiable)
            x1, x2 = x1.float(), x2.float()  # fp32 arithmetic, one rounding (as kvforge.rope)
            return join((x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype), x[..., r:], self.rope)
        out = torch.empty_like(x)  # fp32: four fused in-place operations into one output, no temporaries
        o1, o2 = pairs(out, self.rope)
        torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
        torch.mul(x2, c, out=o2).addcmul_(x1, s)
        out[..., r:] = x[..., r:]
        return out

    # -- the rest of transformers' layer API ---------------------------------------------------------------
    def reset(self) -> None:
        self.seen = 0
        self._seen_t = None
        self.keys = self.values = None

    def stored_bytes(self) -> int:
        """Bytes of the stored entries (fixed for the layer's life): the codes, scales and minima when quantized
        (the decoded copy a read works from is scratch, one per layer here), else the K/V buffers."""
        if not self.is_initialized:
            return 0
        parts = self._kq + self._vq if self.bits < 16 else [self._k, self._v]
        return sum(t.numel() * t.element_size() for t in parts)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            if self.bits < 16:
                self._kq, self._vq = [t[indices] for t in self._kq], [t[indices] for t in self._vq]
            else:
                self._k, self._v = self._k[indices], self._v[indices]
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def offload(self):  # the buffers stay where they are
        pass

    def prefetch(self):
        pass


def _factory(cfg, layer_idx: int, reserve: int) -> SinkWindowLayer:
    """The plan's `sink_window` kind: sizes from the config's `kvforge_streaming` dict (set by `streaming_cache`)."""
    opts = getattr(cfg, "kvforge_streaming", None)
    if not opts:
        raise KVForgeError("sink_window layers need a cache size and sinks; build the cache with "
                           "kvforge.streaming.streaming_cache(model, cache_size, n_sink)")
    rope = layer_rope(cfg, layer_idx)  # None: absolute positions (GPT-2) or a NoPE layer, nothing to turn
    ordered = layer_types(cfg)[layer_idx] != "full_attention"
    return SinkWindowLayer(opts["n_sink"], opts["cache_size"], rope, layer_idx, ordered=ordered,
                           bits=opts.get("bits", 16))


register_layer_kind("sink_window", _factory)
