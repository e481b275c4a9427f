"""Selections as masks: counts along a row with one device-wide scan, positions from a mask, masks packed in bits.

A prefill's prune keeps k of n entries per (row, KV head). These helpers turn a bool keep mask `[..., n]` into the
increasing kept positions without a sort, and park such a mask in n/8 bytes on the device.
"""

from __future__ import annotations

import torch


def _bit_weights(device) -> torch.Tensor:
    """2^j for the bits j = 0..7 of a byte, made on `device` (a host tensor copied there would wait for the stream:
    a copy from pageable memory synchronises first)."""
    return 1 << torch.arange(8, dtype=torch.int16, device=device)


def row_cumsum(mask: torch.Tensor) -> torch.Tensor:
    """Inclusive count of True along the last axis of `mask [..., n]` (int64), as `mask.cumsum(-1)`, through one scan
    of the flattened tensor: a scan along a short batch of long rows runs one block per row on CUDA (0.26 ms for
    8 × 128k on an H200), the flat scan uses the whole device."""
    flat = mask.reshape(-1).cumsum(0).view(mask.shape)
    return flat - (flat[..., -1:] - mask.sum(-1, keepdim=True))


def mask_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the True entries of `mask [..., n]`, exactly `k` per row, increasing: `[..., k]` int64. One scan
    and one scatter (no sort, no host sync); `mask.nonzero()` is the slow twin."""
    n = mask.shape[-1]
    rank = torch.where(mask, row_cumsum(mask) - 1, k)  # the rest go to a spare slot k, dropped
    out = torch.empty(*mask.shape[:-1], k + 1, dtype=torch.long, device=mask.device)
    out.scatter_(-1, rank, torch.arange(n, device=mask.device).expand(mask.shape))
    return out[..., :k]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """`mask [..., n]` bool → `[..., ceil(n / 8)]` uint8, bit j of byte i = mask[..., 8i + j]."""
    n = mask.shape[-1]
    pad = -n % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], pad)], -1)
    groups = mask.view(*mask.shape[:-1], -1, 8).to(torch.int16)
    return (groups * _bit_weights(mask.device)).sum(-1).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `[..., ceil(n / 8)]` uint8 → `[..., n]` bool."""
    out = (bits[..., None].to(torch.int16) & _bit_weights(bits.device)) != 0
    return out.view(*bits.shape[:-1], -1)[..., :n]
