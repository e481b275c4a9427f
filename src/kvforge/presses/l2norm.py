"""L2Norm (KVCache-Factory's name for Knorm): keep the keys with the lowest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024,
https://arxiv.org/abs/2406.11430.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvforge.presses.knorm import KnormPress
from kvforge.presses.registry import register


@register("l2norm")
@dataclass
class L2NormPress(KnormPress):
    """Alias of `knorm`: score = −‖k‖₂ per entry `[B, H_kv, n]`, keep the lowest-norm keys.

    KVCache-Factory's `L2NormCluster` computes `torch.norm(key_states, p=2, dim=-1)`, sorts ascending and
    keeps the first `max_capacity_prompt` entries of every head — no observation window, no pooling, no
    sink — which is exactly kvpress's `KnormPress` (and our `knorm`). The only difference is cosmetic: it
    stores the kept entries in norm order instead of position order, which changes nothing for attention
    (positions are baked into the keys by RoPE). Its `skip_layers` default ([0, 1], layers left
    uncompressed) is a run setting there, not part of the method, and is not reproduced. Registered under
    both names so runs written for either library find it.
    """

    paper = "https://arxiv.org/abs/2406.11430"
