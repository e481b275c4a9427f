"""ThinK: query-driven pruning of key channels.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025, https://arxiv.org/abs/2407.21018 —
per KV head, channel c scores ‖Q_w[:, c]‖₂ · ‖K[:, c]‖₂ (Q_w: the last `window_size` queries, summed over the
query heads of the group); the lowest-scoring fraction of key channels is dropped. `compression_ratio` is
that fraction (the paper's λ; it evaluates 0.4–0.5). Values and token counts are untouched.

The layer stores the kept key channels `[B, H_kv, n, D·(1−λ)]` and their indices; attention sees the
pruned channels as zeros (q·k summed over kept channels only). Keys of tokens generated later are stored
whole, as in the reference implementation, which prunes the prefill cache once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.cache.coded import Codec, CodedLayer, tensor_bytes
from kvforge.presses.base import LayerContext, Press
from kvforge.presses.registry import register


class ChannelCodec(Codec):
    """Keys `[B, H, m, Dk]` of the channels `channels [B, H, Dk]` (of D), values `[B, H, m, Dv]` whole."""

    def __init__(self, keys: torch.Tensor, channels: torch.Tensor, values: torch.Tensor, d: int):
        self.keys, self.channels, self.values, self.d, self.m = keys, channels, values, d, keys.shape[2]

    def decode(self):
        b, h, m, dk = self.keys.shape
        full = self.keys.new_zeros(b, h, m, self.d)
        full.scatter_(3, self.channels[:, :, None, :].expand(b, h, m, dk), self.keys)
        return full, self.values

    def index_batch(self, index) -> ChannelCodec:
        return ChannelCodec(self.keys[index], self.channels[index], self.values[index], self.d)

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.channels, self.values)


def channel_scores(ctx: LayerContext, window: int) -> torch.Tensor:
    """ThinK's channel importance `[B, H_kv, D]`: ‖Q_w[:, c]‖₂ summed over the group, times ‖K[:, c]‖₂."""
    b, hq, q, d = ctx.query.shape
    h = ctx.keys.shape[1]
    w = min(window, q)
    qn = ctx.query[:, :, q - w :].float().norm(dim=2).reshape(b, h, hq // h, d).sum(2)
    keys = ctx.keys.float() * ctx.real[..., None]  # padding entries do not count
    return qn * keys.norm(dim=2)


@register("think")
@dataclass
class ThinKPress(Press):
    """`compression_ratio`: fraction of key channels removed per KV head (λ). Keeps `D − int(D·λ)` channels."""

    kind = "channel"
    query_aware = False
    frees_memory = "yes (key channels)"
    paper = "https://arxiv.org/abs/2407.21018"
    window_size: int = 32

    def compress(self, ctx: LayerContext) -> None:
        d = ctx.keys.shape[-1]
        keep = d - int(d * (self.compression_ratio or 0.0))
        if keep >= d:
            return
        channels = channel_scores(ctx, self.window_size).topk(keep, dim=-1).indices.sort(-1).values

        def build(keys, values, slots, valid):
            b, h, n, _ = keys.shape
            kept = keys.gather(3, channels[:, :, None, :].expand(b, h, n, keep)).contiguous()
            return ChannelCodec(kept, channels, values.contiguous(), d), n

        ctx.cache.layers[ctx.layer_idx] = CodedLayer.from_layer(ctx.layer, build)
