"""KVQuant-style keys: pre-RoPE per-channel non-uniform quantization with dense-and-sparse outliers.

Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization",
NeurIPS 2024, https://arxiv.org/abs/2401.18079. What is done here:
- keys are rotated back to before RoPE (the cache receives post-RoPE keys; the inverse rotation is exact up
  to rounding) and quantized per channel: each channel's range is calibrated on the prefill between its
  `outlier_ratio/2` and `1 − outlier_ratio/2` quantiles (the paper calibrates offline; here online, per row
  and head, at prefill);
- elements outside that range are kept exactly (dense-and-sparse, default 1%), and so are the first `sinks`
  tokens of each row (attention-sink-aware: the paper keeps the first token in fp16);
- non-uniform levels: one codebook of 2^bits levels per layer and sequence, fitted by 1-D k-means on the normalised
  prefill keys (the paper's nuqX fits sensitivity-weighted k-means per channel offline; plain k-means per
  layer and sequence is what is practical online, and keeps a sequence's codes independent of its batch);
- values per token, uniform, in channel groups (as KIVI) with the sinks exact;
- tokens generated later are coded in groups of `group_size` with the prefill's calibration (their
  out-of-range elements become outliers), then RoPE is re-applied at read time.
Paper defaults: nuq4 with 1% outliers (also 3- and 2-bit); first token kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.cache.coded import Codec, tensor_bytes
from kvforge.errors import KVForgeError
from kvforge.kernels.quantize import dequantize_values, pack, quantize_values, unpack
from kvforge.presses.base import LayerContext, QuantizerPress, check_float
from kvforge.presses.registry import register
from kvforge.rope import SEQ_LEN_TYPES, STATIC_TYPES, Rope, apply, rope_for_layer, unapply


def kmeans_levels(x: torch.Tensor, levels: int, iters: int = 8) -> torch.Tensor:
    """1-D k-means of each row of `x` `[..., N]` (values in [-1, 1]) into `levels` sorted centroids `[..., levels]`,
    from a uniform start; a row longer than 2^18 values is fitted on a strided sample of them."""
    lead, n = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n)
    if n > 1 << 18:  # a strided sample is plenty for a 1-D fit
        x = x[:, :: n // (1 << 18) + 1]
    c = torch.linspace(-1.0, 1.0, levels, device=x.device).expand(x.shape[0], levels).clone()
    for _ in range(iters):
        a = (x[:, :, None] - c[:, None, :]).abs().argmin(-1)
        sums = torch.zeros_like(c).scatter_add_(1, a, x)
        counts = torch.zeros_like(c).scatter_add_(1, a, torch.ones_like(x))
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c.sort(-1).values.reshape(*lead, levels)


class KVQuantCodec(Codec):
    """Pre-RoPE keys as codebook indices `[B, H, m, D·bits/8]` (packed) on per-channel ranges `lo, hi [B, H, D]`,
    values as KIVI per-token codes; `exact`: (flat index into m·D `[B, H, k]`, key values, value values)
    per chunk for outliers and sinks. Positions `pos [B, m]` re-apply RoPE at read time."""

    def __init__(self, press, calib: tuple, chunks: tuple, m: int):
        self.press, self.calib, self.chunks, self.m = press, calib, chunks, m
        self.step, self.residual = press.group_size, press.residual_length

    @classmethod
    def encode(cls, press, keys, values, positions, pad, rope: Rope) -> KVQuantCodec:
        pre = unapply(keys, positions, rope).float()
        p = press.outlier_ratio / 2
        b, h, m, d = pre.shape
        if m:
            lo = pre.quantile(p, dim=2) if m > 1 else pre[:, :, 0]
            hi = pre.quantile(1 - p, dim=2) if m > 1 else pre[:, :, 0]
        else:
            lo = hi = pre.new_zeros(b, h, d)
        hi = torch.maximum(hi, lo + 1e-6)
        norm = ((pre - lo[:, :, None]) / (hi - lo)[:, :, None] * 2 - 1).clamp(-1, 1)
        # one codebook per (layer, row): a row's codes never depend on the other rows of its batch
        levels = (kmeans_levels(norm.flatten(1), 2**press.bits) if m
                  else torch.linspace(-1, 1, 2**press.bits, device=keys.device).expand(b, -1))
        calib = (lo.to(keys.dtype), hi.to(keys.dtype), levels.to(keys.device), rope)
        codec = cls(press, calib, (), 0)
        codec.pad = pad
        return codec.append(keys, values, positions=positions)

    def append(self, keys, values, slots=None, positions=None) -> KVQuantCodec:
        press = self.press
        lo, hi, levels, rope = self.calib
        if positions is None:  # position of an entry = its logical slot − the left padding of its row
            positions = slots - self.pad[:, None, None]
        pre = unapply(keys, positions, rope).float()
        b, h, m, d = pre.shape
        lo_f, hi_f = lo.float()[:, :, None], hi.float()[:, :, None]
        norm = (pre - lo_f) / (hi_f - lo_f) * 2 - 1
        exact = (norm < -1) | (norm > 1)
        exact |= ((positions >= 0) & (positions < press.sinks))[..., None]  # sinks: every channel kept exactly
        codes = (norm.clamp(-1, 1)[..., None] - levels[:, None, None, None, :]).abs().argmin(-1).to(torch.uint8)
        kq = pack(codes, press.bits)
        vq = quantize_values(values, press.bits, press.group_size)
        # sparse exact set, same count in every (row, head) so it stays a dense tensor: the largest one wins
        flat = exact.flatten(2)
        k = int(flat.sum(-1).max()) if flat.numel() else 0
        idx = flat.to(torch.int8).topk(k, dim=-1, sorted=False).indices if k else flat.new_zeros(b, h, 0).long()
        kx = pre.flatten(2).gather(-1, idx).to(keys.dtype)  # exact pre-RoPE values (RoPE mixes channel pairs)
        vx = values.flatten(2).gather(-1, idx) if values.shape[-1] == d else None
        chunk = (kq, vq, idx.to(torch.int32), kx, vx, positions.clamp_min(0))
        new = KVQuantCodec(press, self.calib, self.chunks + (chunk,), self.m + m)
        new.pad = self.pad
        return new

    def decode(self):
        lo, hi, levels, rope = self.calib
        press = self.press
        ks, vs = [], []
        for kq, vq, idx, kx, vx, positions in self.chunks:
            codes = unpack(kq, press.bits).long()
            norm = levels.gather(1, codes.flatten(1)).view(codes.shape)
            pre = ((norm + 1) / 2 * (hi.float() - lo.float())[:, :, None] + lo.float()[:, :, None]).to(kx.dtype)
            pre = pre.flatten(2).scatter(-1, idx.long(), kx).view(pre.shape)
            k = apply(pre, positions, rope)
            v = dequantize_values(*vq, press.bits, press.group_size, kx.dtype)
            if vx is not None:
                v = v.flatten(2).scatter(-1, idx.long(), vx).view_as(v)
            ks.append(k)
            vs.append(v)
        return torch.cat(ks, 2), torch.cat(vs, 2)

    def index_batch(self, index) -> KVQuantCodec:  # pragma: no cover - beam search over a quantized cache
        raise KVForgeError("kvquant: reordering the batch of a quantized cache is not supported")

    def nbytes(self) -> int:
        lo, hi, levels, _ = self.calib
        parts = [lo, hi, levels]
        for kq, vq, idx, kx, vx, _pos in self.chunks:
            parts += [kq, *vq, idx, kx, vx]
        return tensor_bytes(*parts)


@register("kvquant")
@dataclass
class KVQuantPress(QuantizerPress):
    """Keys `[B, H_kv, m, D]`: inverse RoPE, per-channel ranges, a non-uniform codebook per layer and row (2^bits
    levels), outliers and sinks exact; values per token. Residual window 0 by default (the paper keeps none)."""

    frees_memory = "yes (bits/16 + outliers)"
    paper = "https://arxiv.org/abs/2401.18079"
    bits: int = 4
    residual_length: int = 0
    outlier_ratio: float = 0.01
    sinks: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.bits == 16:
            raise KVForgeError("kvquant: bits=16; allowed: 2, 4, 8")
        check_float(self, "outlier_ratio", self.outlier_ratio, 0, 1, high_open=True)

    def codec(self, ctx: LayerContext, keys: torch.Tensor, values: torch.Tensor) -> KVQuantCodec:
        m = keys.shape[2]
        slots = ctx.layer.entry_slots()
        if slots is None:
            slots = torch.arange(ctx.layer.n, device=keys.device).expand(*keys.shape[:2], -1)
        pad = slots.new_zeros(keys.shape[0])
        mask = ctx.attention_mask
        if mask is not None:  # left padding: logical slots the last query cannot see
            mask = mask if mask.dtype == torch.bool else mask == 0
            pad = (~mask[:, 0, -1, : ctx.layer.logical]).sum(-1)
        positions = slots[:, :, :m] - pad[:, None, None]
        rope = rope_for_layer(ctx.cache.config, ctx.layer_idx, device=keys.device)
        if rope.rope_type in SEQ_LEN_TYPES:
            raise KVForgeError(f"kvquant: rope_type {rope.rope_type!r} has position-dependent frequencies; "
                               f"allowed: {', '.join(STATIC_TYPES)}")
        return KVQuantCodec.encode(self, keys, values, positions, pad, rope)
