"""Chunk: score a long context chunk by chunk, so the wrapped scorer never sees more than one chunk.

kvpress's ChunkPress (https://github.com/NVIDIA/kvpress). The stored entries of a layer are cut into chunks of
`chunk_length` (default 1024) and the wrapped scorer press scores each chunk on its own — its keys, values and
the queries at the same positions — then keeps `int(len_c · (1 − ratio))` of each chunk's real entries. Memory of
attention-based scorers (SnapKV's window attention) is then bounded by one chunk, and every part of the context
keeps the same share of entries. For SnapKV the observation window is the end of each chunk.

Chunks are cut from the *end* of the sequence (the first chunk is the short one, kvpress cuts from the start):
left padding then shifts no boundary, so a row keeps the same entries alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, Press, check_int, keep_count, select_topk
from kvforge.presses.merge import topk_mask
from kvforge.presses.registry import register, resolve_scorer


class ChunkContext(LayerContext):
    """A view of `parent` restricted to stored entries `[start, stop)` and the queries aligned with them.

    Query i of the forward is aligned with entry `n − q + i` (the forward's tokens are the newest entries), so a
    prefill chunk sees exactly its own tokens' queries. Shapes as in `LayerContext`, with n = stop − start.
    """

    def __init__(self, parent: LayerContext, start: int, stop: int):
        self.__dict__.update({k: v for k, v in parent.__dict__.items() if k in (
            "module", "cache", "layer_idx", "layer", "attention_mask", "scaling", "rank", "num_layers")})
        self.parent, self.start, self.stop = parent, start, stop
        n, q = parent.keys.shape[2], parent.query.shape[2]
        offset = n - q  # entry index of query 0
        self.q0 = min(max(start - offset, 0), q)
        q1 = min(max(stop - offset, 0), q)
        self.query = parent.query[:, :, self.q0 : q1]

    @property
    def keys(self) -> torch.Tensor:
        return self.parent.keys[:, :, self.start : self.stop]

    @property
    def values(self) -> torch.Tensor:
        return self.parent.values[:, :, self.start : self.stop]

    def mask(self, rows: slice | None = None) -> torch.Tensor:
        a, b, _ = (rows if rows is not None else slice(None)).indices(self.query.shape[2])
        m = self.parent.mask(slice(self.q0 + a, self.q0 + b))
        return m[..., self.start : self.stop]

    @cached_property
    def real(self) -> torch.Tensor:
        return self.parent.real[:, :, self.start : self.stop]


@register("chunk")
@dataclass
class ChunkPress(Press):
    """Wraps a scorer press (`press`: a name or a `ScorerPress`; default snapkv). Entries `[B, H_kv, n]` are cut
    into chunks of `chunk_length` from the end; each chunk is scored alone (`[B, H_kv, len_c]`) and keeps
    `int(real_c · (1 − compression_ratio))` entries per head. Only `compression_ratio` is supported."""

    kind = "wrapper"
    paper = "kvpress ChunkPress (https://github.com/NVIDIA/kvpress)"
    press: object = field(default="snapkv")
    chunk_length: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.budget is not None:
            raise KVForgeError("chunk: budget is not supported (the ratio applies per chunk); give compression_ratio")
        self.press = resolve_scorer(self.name, self.press)
        check_int(self, "chunk_length", self.chunk_length, minimum=1)

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """Chunk `[start, stop)` ranges over `n` entries, cut from the end."""
        return [(max(0, stop - self.chunk_length), stop) for stop in range(n, 0, -self.chunk_length)][::-1]

    def compress(self, ctx: LayerContext) -> None:
        n = ctx.keys.shape[2]
        if keep_count(ctx.n_real, self.compression_ratio, None).ge(ctx.n_real).all():
            return
        keep = torch.zeros_like(ctx.real)
        for start, stop in self.bounds(n):
            sub = ChunkContext(ctx, start, stop)
            k = keep_count(sub.n_real, self.compression_ratio, None)
            if sub.query.shape[2] == 0:  # no query of this forward lies in the chunk: keep its first entries
                scores = torch.zeros(sub.real.shape, device=ctx.keys.device)
            else:
                scores = self.press.score(sub)
            keep[:, :, start:stop] = topk_mask(sub, scores, k)
        total = keep.sum(-1).amax(-1)  # [B]: the same for every head of a row
        select_topk(ctx, keep.float(), total)
