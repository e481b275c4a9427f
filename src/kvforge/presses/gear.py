"""GEAR: quantization + low-rank approximation of its error + sparse outliers.

Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of
LLM", 2024, https://arxiv.org/abs/2403.05527 — x ≈ Q(x − S) + L + S with S the largest-magnitude
entries kept exactly and L a rank-r approximation of the quantization residual. Defaults follow the
paper's GEAR-KIVI setting: 4 bits with KIVI's grouping, rank 4, 2% outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.cache.codecs import GearCodec
from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, QuantizerPress, check_float, check_int
from kvforge.presses.registry import register


@register("gear")
@dataclass
class GearPress(QuantizerPress):
    """Per chunk of coded tokens and per (row, KV head): outliers `[B, H_kv, s·m·D]` (flat index + value),
    KIVI codes of the rest, factors A `[B, H_kv, m, rank]`, B `[B, H_kv, rank, D]` of the residual."""

    frees_memory = "yes (bits/16 + scales + rank + outliers)"
    paper = "https://arxiv.org/abs/2403.05527"
    bits: int = 4
    rank: int = 4
    outlier_ratio: float = 0.02

    def __post_init__(self):
        super().__post_init__()
        if self.bits == 16:
            raise KVForgeError("gear: bits=16; allowed: 2, 4, 8 (use kivi with bits=16 for the identity)")
        check_int(self, "rank", self.rank, minimum=0)
        check_float(self, "outlier_ratio", self.outlier_ratio, 0, 1, high_open=True)

    def codec(self, ctx: LayerContext, keys: torch.Tensor, values: torch.Tensor) -> GearCodec:
        return GearCodec.encode(keys, values, self.bits, self.group_size, self.residual_length, self.rank,
                                self.outlier_ratio)
