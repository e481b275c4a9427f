"""`LayerContext`: what the attention function hands a press for one layer (queries, stored entries, masks)."""

from __future__ import annotations

from functools import cached_property

import torch

from kvforge.attention.masks import entry_mask
from kvforge.kernels.window_scores import can_fuse, window_colsum


class LayerContext:
    """Everything a press may read for one layer, computed lazily.

    Shapes: `query [B, Hq, q, D]` (this forward's queries), `keys [B, H_kv, n, D]`, `values [B, H_kv, n, Dv]`
    (every stored entry of the layer, the new ones included), `real [B, H_kv, n]` (entry is a real token,
    not padding or an invalid slot), `token_index [B, H_kv, n]` (position among the row's real tokens).
    """

    def __init__(self, module, cache, layer_idx: int, query: torch.Tensor, attention_mask, scaling: float | None):
        self.module = module
        self.cache = cache
        self.layer_idx = layer_idx
        self.layer = cache.layers[layer_idx]
        self.query = query
        self.attention_mask = attention_mask
        self.scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        compressible = cache.compressible_layers()
        self.rank = compressible.index(layer_idx)  # index among compressible layers
        self.num_layers = len(compressible)

    @property
    def keys(self) -> torch.Tensor:
        return self.layer.kv()[0]

    @property
    def values(self) -> torch.Tensor:
        return self.layer.kv()[1]

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]

    def mask(self, rows: slice | None = None) -> torch.Tensor:
        """Bool mask of (some of) this forward's queries over the stored entries, `[B, 1 | H_kv, r, n]`."""
        q = self.query.shape[2]
        m = entry_mask(self.attention_mask, self.layer, q, rows=rows if rows is not None else slice(0, q))
        return m

    @cached_property
    def all_real(self) -> bool:
        """True when every stored entry is real (`real` is all True, known without reading the device): no logical
        mask (no padding; the newest query sees every stored entry, causality included) and no invalid entries.
        False says nothing. Read through `real`, so a context given its own `real` is never all real."""
        return self.real is not None and self.__dict__.get("_all_real", False)

    @cached_property
    def real(self) -> torch.Tensor:
        b, h, n = self.keys.shape[:3]
        if self.attention_mask is None and self.layer.entry_valid() is None:
            # what the mask's last row is then (bottom-right causal, or every slot below the logical length): no mask
            self.__dict__["_all_real"] = True
            return torch.ones(1, 1, 1, dtype=torch.bool, device=self.keys.device).expand(b, h, n)
        return self.mask(slice(-1, None))[:, :, 0].expand(b, h, n)

    @cached_property
    def n_real(self) -> torch.Tensor:
        """Real entries per row `[B]` (the most any head holds)."""
        if self.all_real:
            b, _, n = self.keys.shape[:3]
            return torch.full((b,), n, dtype=torch.long, device=self.keys.device)
        return self.real.sum(-1).amax(-1)

    @cached_property
    def n_seen(self) -> torch.Tensor:
        """What a compression ratio applies to, per row `[B]`. In a prefill compressed chunk by chunk
        (`KVCache(chunk_size=...)`): the real tokens this layer has seen, evicted ones included, read from the logical
        mask's last query (a real token under left padding). Otherwise the real entries stored, `n_real` (a press in
        a composition applies its ratio to what the presses before it left)."""
        if getattr(self.cache, "chunk_size", None) is None:
            return self.n_real
        m = self.attention_mask
        if m is None:
            return torch.full((self.query.shape[0],), self.layer.logical, device=self.query.device)
        last = m[:, 0, -1]
        return (last if last.dtype == torch.bool else last == 0).sum(-1)

    @cached_property
    def token_index(self) -> torch.Tensor:
        if self.all_real:
            b, h, n = self.keys.shape[:3]
            return torch.arange(n, device=self.keys.device).expand(b, h, n)
        return self.real.long().cumsum(-1) - 1

    def window_attention(self, window: int) -> torch.Tensor:
        """Softmax attention of the last `window` queries over every entry, float32, `[B, H_kv, G, w, n]`.

        The logits are computed in the keys' dtype and the softmax in float32, as SnapKV's and kvpress's code do
        (`matmul` in the model dtype, `softmax(..., dtype=float32)`): no float32 copy of the layer's keys (0.5 GB
        per layer of Llama-3.1-8B at 128k). `window_attention_reference` is the float32 twin."""
        b, hq, q, d = self.query.shape
        h = self.keys.shape[1]
        w = min(window, q)
        # the scale goes into the w queries (rounded once to the keys' dtype, as the logits are): no pass over w × n
        qw = (self.query[:, :, q - w :].float() * self.scaling).to(self.keys.dtype).reshape(b, h, self.groups, w, d)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", qw, self.keys)
        if self.all_real:  # bottom-right causal, no padding: only the last w entries are hidden from some window
            # query, and every query sees an entry (itself), so no row is all -inf
            n = logits.shape[-1]
            hidden = torch.ones(w, w, dtype=torch.bool, device=logits.device).triu_(1)
            logits[..., n - w :].masked_fill_(hidden, float("-inf"))
            return torch.softmax(logits, dim=-1, dtype=torch.float32)
        mask = self.mask(slice(q - w, q))  # [B, 1|H, w, n]
        logits.masked_fill_(~mask[:, :, None], float("-inf"))  # in place: w × n per query head, once
        return torch.softmax(logits, dim=-1, dtype=torch.float32).nan_to_num_(0.0)

    def window_attention_sum(self, window: int) -> torch.Tensor:
        """`window_attention(window)` summed over its queries, float32 `[B, H_kv, G, n]`: what SnapKV, TOVA and the
        merging presses score by. In a plain prefill on CUDA (`all_real`) the fused Triton kernels of
        `kvforge.kernels.window_scores`, which never hold the `[B, Hq, w, n]` probabilities (1 GB of float32 per layer
        at 128k and w = 64) and keep the logits in float32; elsewhere `window_attention(w).sum(3)`."""
        w = min(window, self.query.shape[2])
        if self.all_real and can_fuse(self.query, self.keys):
            return window_colsum(self.query, self.keys, w, self.scaling)
        return self.window_attention(w).sum(3)

    def window_attention_reference(self, window: int) -> torch.Tensor:
        """`window_attention` in float32 throughout (the slow, obviously-correct twin)."""
        b, hq, q, d = self.query.shape
        h = self.keys.shape[1]
        w = min(window, q)
        qw = self.query[:, :, q - w :].float().reshape(b, h, self.groups, w, d)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", qw, self.keys.float()) * self.scaling
        logits = logits.masked_fill(~self.mask(slice(q - w, q))[:, :, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)
