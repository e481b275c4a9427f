"""KIVI: tuning-free asymmetric 2-bit quantization of the KV cache.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024,
https://arxiv.org/abs/2402.02750 — keys quantized per channel (outlier channels stay within their own
scale), values per token; the newest R tokens in full precision. Paper defaults: 2 bits, group 32,
residual 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.cache.codecs import KiviCodec
from kvforge.presses.base import LayerContext, QuantizerPress
from kvforge.presses.registry import register


@register("kivi")
@dataclass
class KiviPress(QuantizerPress):
    """Keys `[B, H_kv, m, D]` -> codes packed along D (`bits` each), scale/min per (token group, channel);
    values -> codes, scale/min per (token, channel group). See `kvforge.kernels.quantize` for the byte layout."""

    frees_memory = "yes (bits/16 + scales)"
    paper = "https://arxiv.org/abs/2402.02750"

    def codec(self, ctx: LayerContext, keys: torch.Tensor, values: torch.Tensor) -> KiviCodec:
        return KiviCodec.encode(keys, values, self.bits, self.group_size, self.residual_length)
