"""The codecs of the quantizing presses (KIVI, GEAR): immutable coded parts of a `CodedLayer`."""

from __future__ import annotations

import torch

from kvforge.cache.coded import Codec, tensor_bytes
from kvforge.kernels.quantize import (
    dequantize_keys,
    dequantize_values,
    low_rank,
    outliers,
    quantize_keys,
    quantize_values,
    scatter_set,
)


class KiviCodec(Codec):
    """KIVI: packed keys (per channel, token groups) and values (per token, channel groups); flat tensors.

    `parts` = (key codes, key scale, key min, value codes, value scale, value min), see the module docstring."""

    def __init__(self, bits: int, group: int, residual: int, parts: tuple, m: int, dtype):
        self.bits, self.step, self.residual, self.parts, self.m, self.dtype = bits, group, residual, parts, m, dtype
        self.fused_layout = bits != 16  # the fused decode kernel reads these parts as they are

    @classmethod
    def encode(cls, keys, values, bits: int, group: int, residual: int) -> KiviCodec:
        if bits == 16:
            return cls(bits, group, residual, (keys, values), keys.shape[2], keys.dtype)
        parts = quantize_keys(keys, bits, group) + quantize_values(values, bits, group)
        return cls(bits, group, residual, parts, keys.shape[2], keys.dtype)

    def decode(self):
        if self.bits == 16:
            return self.parts
        kq, ks, kz, vq, vs, vz = self.parts
        return (dequantize_keys(kq, ks, kz, self.bits, self.step, self.dtype),
                dequantize_values(vq, vs, vz, self.bits, self.step, self.dtype))

    def append(self, keys, values, slots) -> KiviCodec:
        new = self.encode(keys, values, self.bits, self.step, self.residual)
        parts = tuple(torch.cat([a, b], 2) for a, b in zip(self.parts, new.parts))
        return KiviCodec(self.bits, self.step, self.residual, parts, self.m + new.m, self.dtype)

    def index_batch(self, index) -> KiviCodec:
        return KiviCodec(self.bits, self.step, self.residual, tuple(p[index] for p in self.parts), self.m, self.dtype)

    def nbytes(self) -> int:
        return tensor_bytes(*self.parts)


class GearCodec(Codec):
    """GEAR: x = quantized(x − S) + A·B + S per chunk of coded tokens, for keys and values alike.

    S: the `outlier_ratio` largest-magnitude elements kept exactly (sparse); the quantization backbone is KIVI's
    (keys per channel, values per token); A·B the best rank-`rank` approximation of the quantization error.
    Chunks are coded independently as they leave the residual window (each with its own factors)."""

    def __init__(self, bits, group, residual, rank, outlier_ratio, chunks: tuple, m: int):
        self.bits, self.step, self.residual, self.rank, self.outlier_ratio = bits, group, residual, rank, outlier_ratio
        self.chunks, self.m = chunks, m

    @staticmethod
    def _code(x, quant, dequant, bits, group, rank, ratio):
        idx, val = outliers(x, ratio)
        dense = scatter_set(x, idx, torch.zeros_like(val))
        q = quant(dense, bits, group)
        err = dense - dequant(*q, bits, group, x.dtype)
        a, b = low_rank(err, rank)
        return q, a, b, idx, val

    @staticmethod
    def _decode(part, dequant, bits, group, dtype):
        q, a, b, idx, val = part
        x = dequant(*q, bits, group, dtype) + (a.float() @ b.float()).to(dtype)
        return scatter_set(x, idx, val)

    @classmethod
    def encode(cls, keys, values, bits, group, residual, rank, ratio) -> GearCodec:
        chunk = (cls._code(keys, quantize_keys, dequantize_keys, bits, group, rank, ratio),
                 cls._code(values, quantize_values, dequantize_values, bits, group, rank, ratio))
        return cls(bits, group, residual, rank, ratio, (chunk,), keys.shape[2])

    def decode(self):
        dtype = self.chunks[0][0][1].dtype
        ks = [self._decode(c[0], dequantize_keys, self.bits, self.step, dtype) for c in self.chunks]
        vs = [self._decode(c[1], dequantize_values, self.bits, self.step, dtype) for c in self.chunks]
        return torch.cat(ks, 2), torch.cat(vs, 2)

    def append(self, keys, values, slots) -> GearCodec:
        new = self.encode(keys, values, self.bits, self.step, self.residual, self.rank, self.outlier_ratio)
        return GearCodec(self.bits, self.step, self.residual, self.rank, self.outlier_ratio,
                         self.chunks + new.chunks, self.m + new.m)

    def index_batch(self, index) -> GearCodec:
        def sel(t):
            return tuple(sel(x) for x in t) if isinstance(t, tuple) else t[index]

        return GearCodec(self.bits, self.step, self.residual, self.rank, self.outlier_ratio,
                         tuple(sel(c) for c in self.chunks), self.m)

    def nbytes(self) -> int:
        def flat(t):
            return [y for x in t for y in flat(x)] if isinstance(t, tuple) else [t]

        return tensor_bytes(*flat(self.chunks))
