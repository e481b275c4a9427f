"""Attention backends over a GQA cache. `sdpa` is the fast path; `eager` is its slow, obviously-correct twin.

Shapes: query `[B, Hq, q, D]`, key `[B, H_kv, n, D]`, value `[B, H_kv, n, Dv]`, mask None or bool
`[B, 1 | H_kv, q, n]` (True = attend); `is_causal` with no mask is bottom-right aligned (query i sits at key
n − q + i), as `causal_mask`. Output `[B, Hq, q, Dv]`. Query head `i` reads KV head `i // G`
with `G = Hq // H_kv` (the `repeat_kv` convention). Rows with nothing to attend give zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right


def causal_mask(q: int, n: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask `[1, 1, q, n]`: query i sits at key position n - q + i."""
    return (torch.arange(n, device=device)[None, :] <= torch.arange(n - q, n, device=device)[:, None])[None, None]


def sdpa(query, key, value, mask=None, scale=None, is_causal=False):
    """SDPA without ever expanding K/V per query head.

    A mask shared by all heads uses `enable_gqa`; a mask per KV head folds each KV head's G query heads
    into the query axis (`[B, H_kv, G*q, D]`), so the mask broadcasts over them (a view when q == 1).
    """
    b, hq, q, d = query.shape
    h = key.shape[1]
    g = hq // h
    if mask is None and is_causal and q < key.shape[2]:
        # bottom-right causal over a longer key (a prefill chunk after earlier ones): never a q × n tensor on CUDA
        # (flash attention's causal is bottom-right), materialised by torch elsewhere
        mask, is_causal = causal_lower_right(q, key.shape[2]), False
    if mask is None or isinstance(mask, CausalBias) or mask.shape[1] == 1 or g == 1:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=g > 1
        )
    n = key.shape[2]
    qf = query.reshape(b, h, g * q, d)
    mf = mask if q == 1 else mask[:, :, None].expand(b, h, g, q, n).reshape(b, h, g * q, n)
    out = F.scaled_dot_product_attention(qf, key, value, attn_mask=mf, scale=scale)
    return out.reshape(b, hq, q, value.shape[-1])


def eager(query, key, value, mask=None, scale=None, is_causal=False, softcap=None, sinks=None):
    """Reference: expand K/V per query head, softmax in float32, zeros for rows with nothing to attend.
    `softcap` (Gemma 2's `attn_logit_softcapping`): logits become softcap·tanh(logits / softcap) before the mask, as
    transformers' eager attention does. `sinks` `[Hq]` (gpt-oss's learned `sinks`): one more logit per head that
    takes part in the softmax and is then dropped (attention mass that goes nowhere). SDPA has neither, so such a
    model runs this path."""
    b, hq, q, d = query.shape
    h, n = key.shape[1], key.shape[2]
    g = hq // h
    k = key.repeat_interleave(g, dim=1).float()
    v = value.repeat_interleave(g, dim=1).float()
    scale = d**-0.5 if scale is None else scale
    logits = query.float() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is None and is_causal:
        mask = causal_mask(q, n, query.device)
    if mask is not None:
        mask = mask.repeat_interleave(g, dim=1) if mask.shape[1] == h and g > 1 else mask
        logits = logits.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, hq, 1, 1).expand(b, hq, q, 1)
        probs = torch.softmax(torch.cat([logits, sink], -1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ v).to(query.dtype)


BACKENDS = {"sdpa": sdpa, "eager": eager}
