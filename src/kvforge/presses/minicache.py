"""MiniCache: merge the KV cache of adjacent layers in the depth dimension.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", NeurIPS 2024,
https://arxiv.org/abs/2405.14366 — from the middle layer up, the states of layers l and l+1 are split into
magnitude and direction; one direction per token is stored for the pair (SLERP of the two at t = 0.6),
each layer keeps its own magnitudes, and the tokens whose directions disagree most (largest angular
distance d = θ/π) are retained unmerged. Paper defaults: start at the middle layer, t = 0.6, γ = 0.05.

γ here is the fraction of tokens retained per (row, KV head): the ⌈γ·m⌉ largest d. The paper's rule
(d > d_min + (d_max − d_min)·γ) retained 99.8–99.9% of the tokens of SmolLM2-135M (one near-parallel token
sets d_min; the rest sit far above it), which merges almost nothing; see docs/decisions.md.

Storage per merged pair: one direction tensor instead of two, two magnitude vectors, and the retained
tokens' original vectors; the second layer owns no full key/value buffer (its `stats()` bytes say so).
Adjacent = adjacent among full-attention layers (Gemma3's sliding layers are skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvforge.cache.coded import Codec, CodedLayer, tensor_bytes
from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, Press, check_float
from kvforge.presses.registry import register


def slerp(u1: torch.Tensor, u2: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical interpolation of unit vectors `[..., D]` at t (0 -> u1); returns (direction, angle θ `[...]`)."""
    cos = (u1 * u2).sum(-1).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    small = sin < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    w1 = torch.where(small, 1.0 - t, torch.sin((1.0 - t) * theta) / safe)
    w2 = torch.where(small, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    e = w1[..., None] * u1 + w2[..., None] * u2
    return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12), theta


def merge_pair(x1: torch.Tensor, x2: torch.Tensor, t: float, gamma: float):
    """Merge one state of two layers `[B, H, m, D]`: (direction, norms1, norms2, retained `[B, H, m]` bool);
    retained: the ⌈γ·m⌉ tokens of largest angular distance per (row, head)."""
    x1f, x2f = x1.float(), x2.float()
    n1, n2 = x1f.norm(dim=-1), x2f.norm(dim=-1)
    e, theta = slerp(x1f / n1[..., None].clamp_min(1e-12), x2f / n2[..., None].clamp_min(1e-12), t)
    d = theta / math.pi
    k = math.ceil(gamma * d.shape[-1])
    retained = torch.zeros_like(d, dtype=torch.bool).scatter_(-1, d.topk(k, dim=-1).indices, True)
    return e.to(x1.dtype), n1.to(x1.dtype), n2.to(x1.dtype), retained


class SharedDirections:
    """Unit directions `[B, H, m, D]` of keys and values, stored once for the two layers of a pair."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class MergedCodec(Codec):
    """One layer of a merged pair: its magnitudes `[B, H, m]` on the shared directions, and its retained
    tokens' vectors (flat index into B·H·m, vectors `[r, D]`), separately for keys and values."""

    def __init__(self, shared: SharedDirections, norms: tuple, retained: tuple):
        self.shared, self.norms, self.retained = shared, norms, retained
        self.m = shared.keys.shape[2]

    def decode(self):
        out = []
        for e, n, (idx, vec) in zip((self.shared.keys, self.shared.values), self.norms, self.retained):
            x = (e * n[..., None]).flatten(0, 2).clone()
            x[idx] = vec
            out.append(x.view_as(e))
        return tuple(out)

    def index_batch(self, index) -> MergedCodec:  # pragma: no cover - beam search over a merged cache
        raise KVForgeError("minicache: reordering the batch of a merged cache is not supported")

    def nbytes(self) -> int:
        # each layer of the pair accounts for half of the shared directions
        return (tensor_bytes(self.shared.keys, self.shared.values) // 2
                + tensor_bytes(*self.norms, *[t for r in self.retained for t in r]))


@register("minicache")
@dataclass
class MiniCachePress(Press):
    """`start`: first merged layer as a fraction of the full-attention layers (0.5 = the middle); pairs
    (l, l+1) from there up. `t`: SLERP position; `gamma`: retention threshold. Evicts no tokens
    (`compression_ratio` must be 0; compose with an eviction press for more)."""

    kind = "layer"
    ratio_free = True
    frees_memory = "yes (one direction per merged pair)"
    paper = "https://arxiv.org/abs/2405.14366"
    start: float = 0.5
    t: float = 0.6
    gamma: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if self.budget is not None or self.compression_ratio:
            raise KVForgeError("minicache merges layers and evicts no tokens: compression_ratio must be 0")
        for name in ("start", "t", "gamma"):
            check_float(self, name, getattr(self, name), 0, 1)

    def pair_second(self, rank: int, num_layers: int) -> bool:
        """True when compressible layer `rank` is the second of a merged pair."""
        first = math.ceil(self.start * num_layers)
        return rank > first and (rank - first) % 2 == 1

    def compress(self, ctx: LayerContext) -> None:
        if not self.pair_second(ctx.rank, ctx.num_layers):
            return
        cache = ctx.cache
        prev_idx = cache.compressible_layers()[ctx.rank - 1]
        a, b = cache.layers[prev_idx], ctx.layer
        if isinstance(a, CodedLayer):
            raise KVForgeError("minicache: the previous layer is already coded (quantized or channel-pruned); "
                               "minicache must be the only coding press of a composed press")
        varlen = a.entry_valid() is not None or b.entry_valid() is not None
        if varlen or not torch.equal(a.entries()[2], b.entries()[2]):
            raise KVForgeError("minicache: the two layers of a pair must hold the same tokens; apply it before "
                               "eviction presses that choose per layer, or with uniform ones only")
        ek, nk1, nk2, rk = merge_pair(a.keys, b.keys, self.t, self.gamma)
        ev, nv1, nv2, rv = merge_pair(a.values, b.values, self.t, self.gamma)
        shared = SharedDirections(ek.contiguous(), ev.contiguous())
        rk_idx, rv_idx = rk.flatten().nonzero()[:, 0], rv.flatten().nonzero()[:, 0]
        d = a.keys.shape[-1]
        for idx, layer, nk, nv in ((prev_idx, a, nk1, nv1), (ctx.layer_idx, b, nk2, nv2)):
            retained = ((rk_idx, layer.keys.reshape(-1, d)[rk_idx].clone()),
                        (rv_idx, layer.values.reshape(-1, layer.values.shape[-1])[rv_idx].clone()))
            codec = MergedCodec(shared, (nk, nv), retained)
            cache.layers[idx] = CodedLayer.from_layer(layer, lambda k, v, s, valid, c=codec: (c, c.m))
