"""Coded layers: the older entries of a layer held in a compact *code* (quantized, channel-pruned, merged
across layers), the newer ones in a full-precision tail.

`CodedLayer` is a `DenseLayer` whose dense buffer is only the tail; the coded part is a `Codec`, an
immutable object (appending makes a new one), so snapshots, forks and restores keep working by reference.
Attention reads `full()`: the code decoded, followed by the tail. On CPU that decoded copy is transient
(one layer at a time, freed after its attention); on CUDA the quantized codes are read by a fused kernel
instead (`kvforge.kernels.quant_decode`). Stored bytes are the code's bytes plus the tail's.
"""

from __future__ import annotations

import os

import torch

from kvforge.cache.layers import DenseLayer
from kvforge.errors import KVForgeError


class Codec:
    """The coded part of a layer: `m` entries. Shapes: decode() -> keys `[B, H_kv, m, Dk]`, values
    `[B, H_kv, m, Dv]`. Subclasses are immutable."""

    m: int = 0
    # streaming codecs take entries leaving the tail: `step` entries at a time, once the tail holds more than
    # `residual` newer ones (KIVI's full-precision residual window). step 0 = the code never grows.
    step: int = 0
    residual: int = 0

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def nbytes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def index_batch(self, index: torch.Tensor) -> Codec:  # pragma: no cover - abstract
        raise NotImplementedError

    def append(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> Codec:  # pragma: no cover
        raise NotImplementedError


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class CodedLayer(DenseLayer):
    """`codec` holds the first `codec.m` entries (logical slots `c_slots [B, H_kv, m]`, validity `c_valid` or
    None); the dense buffer holds the `n` tail entries. Entries cannot be evicted once coded: put eviction
    presses before a coding press (`composed`)."""

    compressible = True  # still a full-attention layer: press ranks and pending sets must not shift
    rewritable = False

    def __init__(self, reserve: int = 256, **kwargs):
        super().__init__(reserve=reserve)
        self.codec: Codec | None = None
        self.c_slots: torch.Tensor | None = None
        self.c_valid: torch.Tensor | None = None

    @classmethod
    def from_layer(cls, layer: DenseLayer, build) -> CodedLayer:
        """Code the entries of `layer` (any kind). `build(keys, values, slots, valid) -> (codec, m)` codes the
        first m entries; the rest become the tail (a streaming codec's residual window)."""
        keys, values, slots, valid = layer.entries()
        if layer.entry_valid() is None:
            valid = None
        codec, m = build(keys, values, slots, valid)
        if valid is not None and m < keys.shape[2]:
            raise KVForgeError("a head-varlen layer must be coded whole (its tail cannot hold invalid entries)")
        new = cls.from_entries(keys[:, :, m:], values[:, :, m:], slots[:, :, m:], logical=layer.logical,
                               reserve=layer.reserve)
        new.codec, new.c_slots = codec, slots[:, :, :m].contiguous()
        new.c_valid = None if valid is None else valid[:, :, :m].contiguous()
        new.press_state = layer.press_state
        return new

    # -- reading -----------------------------------------------------------------------------------------
    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every entry in full precision, coded first: `[B, H_kv, m + n, D]` (transient)."""
        ck, cv = self.codec.decode()
        if self.n == 0:
            return ck, cv
        return torch.cat([ck, self._k[:, :, : self.n]], 2), torch.cat([cv, self._v[:, :, : self.n]], 2)

    kv = full

    def entry_slots(self) -> torch.Tensor:
        return torch.cat([self.c_slots, self.slots[:, :, : self.n]], 2)

    def entry_valid(self) -> torch.Tensor | None:
        if self.c_valid is None:
            return None
        tail = torch.ones(*self.c_valid.shape[:2], self.n, dtype=torch.bool, device=self.device)
        return torch.cat([self.c_valid, tail], 2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append to the tail (coding whole groups that leave the residual window) and return the tail views;
        the attention function reads the coded part itself (`full()`, or the fused kernel on CUDA)."""
        if self.graph is not None:  # CUDA-graph step: static tail; GraphDecoder runs the steps that code eagerly
            return self.graph_update(key_states, value_states)
        DenseLayer.update(self, key_states, value_states)
        c = self.codec
        if c.step and self.n >= c.residual + c.step:
            move = (self.n - c.residual) // c.step * c.step
            self.codec = c.append(self._k[:, :, :move], self._v[:, :, :move], self.slots[:, :, :move])
            self.c_slots = torch.cat([self.c_slots, self.slots[:, :, :move]], 2)
            if self.c_valid is not None:
                self.c_valid = torch.cat([self.c_valid, self.c_valid.new_ones(*self.c_valid.shape[:2], move)], 2)
            self._replace(self._k[:, :, move : self.n], self._v[:, :, move : self.n], self.slots[:, :, move : self.n])
        return self.keys, self.values

    def codes_on_next_append(self) -> bool:
        """True when appending one more entry makes `update` code a group (the tail reaches residual + group):
        `GraphDecoder` runs that step eagerly."""
        c = self.codec
        return bool(c.step) and self.n + 1 >= c.residual + c.step

    def fused(self) -> bool:
        """True when decode attention can read the codes directly (`kvforge.kernels.quant_decode`: the Triton
        kernel on CUDA, its torch twin elsewhere): KIVI codes, every entry valid."""
        return getattr(self.codec, "fused_layout", False) and self.c_valid is None

    def fused_attention(self, query: torch.Tensor, scale: float, tail_len=None) -> torch.Tensor:
        """Decode attention read straight from the codes (`fused()` layers): `query [B, Hq, D]` ->
        `[B, Hq, Dv]`. `tail_len`: the tail entries to read (an int, or a device tensor in graph mode; default
        the host count)."""
        from kvforge.kernels.quant_decode import quant_decode_attention

        c = self.codec
        return quant_decode_attention(query, c.parts, c.bits, c.step, self._k, self._v,
                                      self.n if tail_len is None else tail_len, scale)

    def enter_graph_mode(self, steps: int) -> None:
        """Static tail, device-side length (`DenseLayer`). Fused (KIVI) layers are read by the kernel from their codes;
        the others (GEAR, KVQuant, channel-pruned, merged) through `graph_block`, whose unused tail slots are zeroed
        here: a masked slot must hold a finite number (0 · NaN garbage would poison the softmax).
        `KVFORGE_GRAPH_CODES=0` (debugging) refuses graph mode for those layers: callers then decode eagerly."""
        if not self.fused() and os.environ.get("KVFORGE_GRAPH_CODES", "1") == "0":
            raise KVForgeError("KVFORGE_GRAPH_CODES=0: graph mode only for KIVI codes; decode without graphs")
        super().enter_graph_mode(steps)
        if not self.fused():
            self.zero_spare_()

    def graph_block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Graph mode, a layer the fused kernel cannot read: (keys `[B, H_kv, m + cap, Dk]`, values, validity
        `[B, H_kv, m + cap]`): the code decoded, as the eager step's `full()` decodes it (the code is constant
        between the coding steps, which run eagerly, so it may be decoded inside the captured step: one layer's
        transient copy at a time), then the static tail, valid up to the device-side length."""
        ck, cv = self.codec.decode()
        b, h, m = ck.shape[:3]
        cap = self._k.shape[2]
        tail = (torch.arange(cap, device=self._k.device) < self.graph["pos"]).expand(b, h, cap)
        head = ck.new_ones(b, h, m, dtype=torch.bool) if self.c_valid is None else self.c_valid
        return torch.cat([ck, self._k], 2), torch.cat([cv, self._v], 2), torch.cat([head, tail], 2)

    # -- what a coded layer refuses --------------------------------------------------------------------------
    def keep(self, indices: torch.Tensor, increasing: bool = False) -> None:
        raise KVForgeError("entries of a coded (quantized / channel-pruned / merged) layer cannot be evicted; "
                           "put eviction presses before the coding press in `composed`")

    keep_mask = keep

    def crop(self, tokens_to_remove: int) -> None:
        if -tokens_to_remove > self.n:
            raise KVForgeError(f"crop({tokens_to_remove}): only the {self.n} tail entries of a coded layer can go")
        super().crop(tokens_to_remove)

    # -- state ---------------------------------------------------------------------------------------------
    _STATE = DenseLayer._STATE + ("codec", "c_slots", "c_valid")

    def _index_batch_extra(self, index: torch.Tensor) -> None:
        self.codec = self.codec.index_batch(index)
        self.c_slots = self.c_slots[index]
        if self.c_valid is not None:
            self.c_valid = self.c_valid[index]

    # -- accounting ----------------------------------------------------------------------------------------
    def entry_counts(self) -> int | list[int]:
        if self.c_valid is not None:
            return [int(c) + self.n for c in self.c_valid.sum(-1).amax(0).tolist()]
        return self.codec.m + self.n

    def stored_bytes(self) -> int:
        return self.codec.nbytes() + super().stored_bytes()

    def allocated_bytes(self) -> int:
        return self.codec.nbytes() + super().allocated_bytes()

    def uncompressed_bytes(self) -> int:
        b, h = self._k.shape[:2]
        dk = self._k.shape[3]
        return b * h * self.logical * (dk + self._v.shape[3]) * self._k.element_size()
