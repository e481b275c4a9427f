"""Masks over a layer's stored entries, from the mask transformers builds in logical slot space."""

from __future__ import annotations

import torch


def causal_rows(q_idx: torch.Tensor, q: int, n: int, device: torch.device) -> torch.Tensor:
    """Rows `q_idx` of the bottom-right aligned causal mask of q queries over n keys, `[1, 1, len(q_idx), n]`.
    Only the asked rows are built: `causal_mask(q, n)[:, :, q_idx]` would build all q × n first (17 GB of bool for
    one row at a 128k prefill)."""
    return (torch.arange(n, device=device)[None, :] <= (n - q + q_idx)[:, None])[None, None]


def entry_mask(attention_mask, layer, q: int, rows: slice | None = None) -> torch.Tensor | None:
    """Mask over the layer's stored entries `[B, 1 | H_kv, q, n]` (True = attend), or None.

    `attention_mask` is what transformers built in logical slot space (`[B, 1, q, L]` bool, or None for
    plain causal: then, for all rows, None means the bottom-right causal mask over the stored entries, since the q
    current tokens are the last q entries stored and older entries hold earlier slots). Stored entry t holds logical
    slot `slots[..., t]`; it is visible to query i when that
    slot is visible in the logical mask (causality, padding, windows) and the entry is valid.
    """
    slots, valid = layer.entry_slots(), layer.entry_valid()
    total = layer.logical  # logical length including the q current tokens
    if attention_mask is None and valid is None and rows is None:
        # no padding: the q new entries are the last q stored and every older entry is in the past, so the mask is
        # the bottom-right causal one over the stored entries, which the backends apply without a tensor (is_causal)
        return None
    if attention_mask is not None and rows is not None:
        attention_mask = attention_mask[:, :, rows]
    if slots is None and valid is None and attention_mask is not None:
        return attention_mask
    # from here on a mask tensor is built (not before: an arange per layer and forward, wasted on the paths above)
    start, stop, _ = (slice(0, q) if rows is None else rows).indices(q)
    q_idx = torch.arange(start, stop, device=layer.device)
    if slots is None and valid is None:  # no mask given, so rows were asked for (rows=None returned None above)
        return causal_rows(q_idx, q, layer.n, layer.device)
    n = layer.n if slots is None else slots.shape[-1]
    if slots is None:
        slots = torch.arange(n, device=layer.device).expand(*valid.shape[:2], n)
    b, h = slots.shape[:2]
    nq = len(q_idx)
    if attention_mask is None:
        qslot = total - q + q_idx
        m = slots[:, :, None, :] <= qslot[None, None, :, None]
    else:
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0
        m = attention_mask.expand(b, h, nq, attention_mask.shape[-1]).gather(
            3, slots[:, :, None, :].expand(b, h, nq, n)
        )
    if valid is not None:
        m = m & valid[:, :, None, :]
    return m
