"""KV quantization maths: bit packing and group quantization (the torch side of the fused decode kernel).

Layout (what the fused GPU kernel reads, `kvforge.kernels.quant_decode`):
- codes of `bits` ∈ {2, 4, 8} are packed along the channel axis in *planes*: with `nb = D·bits/8` bytes per
  row, element i sits in byte `i % nb` at bit offset `(i // nb) · bits` (so unpacking one bit-plane gives a
  contiguous run of channels `[k·nb, (k+1)·nb)`: a kernel can dot each plane with its slice of the query, no
  interleaving); keys `[B, H, m, D·bits/8]` uint8, values likewise;
- keys are quantized per channel over groups of `group` tokens: scale and minimum `[B, H, m/group, D]`;
- values per token over groups of `gv` channels: scale and minimum `[B, H, m, D/gv]`;
- x ≈ code · scale + minimum (asymmetric, round to nearest); scales and minima are stored in the cache dtype.
`bits=16` is the identity (entries stored as they are), for exactness tests.
"""

from __future__ import annotations

import torch

from kvforge.errors import KVForgeError

BITS = (2, 4, 8, 16)


def check_bits(name: str, bits: int, group_size: int, residual_length: int) -> None:
    if bits not in BITS:
        raise KVForgeError(f"{name}: bits={bits!r}; allowed: {', '.join(map(str, BITS))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise KVForgeError(f"{name}: group_size={group_size!r} must be a positive integer (tokens per key group)")
    if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
        raise KVForgeError(f"{name}: residual_length={residual_length!r} must be an integer >= 0")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes `[..., n]` (each < 2**bits) -> packed bytes `[..., n·bits/8]` (bit-planes, see above)."""
    per = 8 // bits
    c = codes.to(torch.int32).unflatten(-1, (per, codes.shape[-1] // per))  # plane k = elements [k·nb, (k+1)·nb)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32)[:, None] * bits
    return (c << shifts).sum(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes `[..., n·bits/8]` -> uint8 codes `[..., n]`."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32)[:, None] * bits
    return ((packed.to(torch.int32)[..., None, :] >> shifts) & (2**bits - 1)).flatten(-2).to(torch.uint8)


def quantize(x: torch.Tensor, bits: int, dim: int, dtype: torch.dtype):
    """Asymmetric min/max quantization of `x` over axis `dim` (one group per slice along it).

    Returns (codes uint8 like x, scale, minimum) with `dim` reduced; scale and minimum are rounded to `dtype`
    first, and the codes computed from the rounded values, so `dequantize` is exactly what was meant."""
    xf = x.float()
    mn = xf.amin(dim, keepdim=True)
    scale = ((xf.amax(dim, keepdim=True) - mn) / (2**bits - 1)).clamp_min(1e-8)
    mn, scale = mn.to(dtype), scale.to(dtype)
    codes = ((xf - mn.float()) / scale.float()).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale.squeeze(dim), mn.squeeze(dim)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, dim: int, dtype: torch.dtype):
    return (codes.float() * scale.float().unsqueeze(dim) + mn.float().unsqueeze(dim)).to(dtype)


def value_group(d: int, group: int) -> int:
    """Channels per value group: `group` when it divides the head dim, else the whole head dim."""
    return group if d % group == 0 else d


def quantize_keys(k: torch.Tensor, bits: int, group: int):
    """Keys `[B, H, m, D]` (m a multiple of group), per channel over token groups -> (packed, scale, min)."""
    b, h, m, d = k.shape
    codes, scale, mn = quantize(k.reshape(b, h, m // group, group, d), bits, 3, k.dtype)
    return pack(codes.reshape(b, h, m, d), bits), scale, mn


def dequantize_keys(packed, scale, mn, bits: int, group: int, dtype) -> torch.Tensor:
    codes = unpack(packed, bits)
    b, h, m, d = codes.shape
    return dequantize(codes.reshape(b, h, m // group, group, d), scale, mn, 3, dtype).reshape(b, h, m, d)


def quantize_values(v: torch.Tensor, bits: int, group: int):
    """Values `[B, H, m, D]`, per token over channel groups -> (packed, scale `[B,H,m,D/gv]`, min)."""
    b, h, m, d = v.shape
    gv = value_group(d, group)
    codes, scale, mn = quantize(v.reshape(b, h, m, d // gv, gv), bits, 4, v.dtype)
    return pack(codes.reshape(b, h, m, d), bits), scale, mn


def dequantize_values(packed, scale, mn, bits: int, group: int, dtype) -> torch.Tensor:
    codes = unpack(packed, bits)
    b, h, m, d = codes.shape
    gv = value_group(d, group)
    return dequantize(codes.reshape(b, h, m, d // gv, gv), scale, mn, 4, dtype).reshape(b, h, m, d)


def coded_count(n: int, group: int, residual: int) -> int:
    """Entries coded out of n: the newest `residual` stay full precision, older ones go in whole groups."""
    return max(0, (n - residual) // group * group)


def outliers(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The `fraction` largest-magnitude elements of each `[B, H]` slice of `x [B, H, m, D]`:
    (flat index `[B, H, k]` into m·D, values `[B, H, k]`)."""
    flat = x.flatten(2)
    k = int(round(fraction * flat.shape[-1]))
    idx = flat.abs().topk(k, dim=-1).indices if k else flat.new_zeros(*flat.shape[:2], 0, dtype=torch.long)
    return idx, flat.gather(-1, idx)


def scatter_set(x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """x `[B, H, m, D]` with the flat positions `idx [B, H, k]` set to `val` (a new tensor)."""
    flat = x.flatten(2).clone()
    flat.scatter_(-1, idx, val.to(x.dtype))
    return flat.view_as(x)


def _no_factors(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-0 factors of r `[B, H, m, D]`: `[B, H, m, 0]` and `[B, H, 0, D]`."""
    return r.new_zeros(*r.shape[:3], 0), r.new_zeros(*r.shape[:2], 0, r.shape[3])


def low_rank(r: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of each `[m, D]` slice of r `[B, H, m, D]`: (A `[B,H,m,rank]`, B `[B,H,rank,D]`).

    From the eigenvectors of the Gram matrix on the smaller side (rᵀr `[D, D]` when m ≥ D, giving the top right
    singular vectors V: r ≈ (rV)Vᵀ; else rrᵀ `[m, m]`, giving U: r ≈ U(Uᵀr)), a float32 product and a float64
    eigensolver, instead of an SVD of the tall slices: the same product A·B (tested against `low_rank_svd`, its
    twin). 5× faster on 2 CPU cores at [8, 3, 4096, 64]; on CUDA a small batched eigensolver replaces a tall SVD."""
    rank = min(rank, r.shape[2], r.shape[3])
    if rank == 0:
        return _no_factors(r)
    x = r.float()
    tall = x.shape[2] >= x.shape[3]
    gram = x.transpose(-1, -2) @ x if tall else x @ x.transpose(-1, -2)
    top = torch.linalg.eigh(gram.double())[1][..., -rank:].flip(-1).float()  # eigenvalues ascend
    if tall:  # top: V [B, H, D, rank]
        return (x @ top).to(r.dtype), top.transpose(-1, -2).to(r.dtype)
    return top.to(r.dtype), (top.transpose(-1, -2) @ x).to(r.dtype)  # top: U [B, H, m, rank]


def low_rank_svd(r: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`low_rank` by a truncated SVD (the slow, obviously correct twin)."""
    rank = min(rank, r.shape[2], r.shape[3])
    if rank == 0:
        return _no_factors(r)
    u, s, vh = torch.linalg.svd(r.float(), full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]).to(r.dtype), vh[..., :rank, :].to(r.dtype)
