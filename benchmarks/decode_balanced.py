"""Prototype (not used by the engine): decode attention with *balanced* split programs (stream-K style).

The engine's split kernel (`kvforge.kernels.decode`) gives each (segment, split) pair a program of `split` keys:
with ragged per-head budgets the programs of one call number e.g. 345 on 132 SMs — 2.6 rounds — and each head's
last split is partial. Here a fixed number of programs P = waves × SMs share the call's key tiles equally: the
tiles of all segments, laid end to end, are cut into P contiguous ranges of ⌊T/P⌋ or ⌈T/P⌉ tiles, so a program may
finish one segment and start the next. Each (segment, program) piece is a partial in the segment's next slot;
the segment's last piece also fills the slots it leaves unused with neutral partials, so the engine's merge
kernel combines them unchanged. Same inputs and output as `decode_attention`. Measured by
`benchmarks/gpu_attention.py` (sweep rows "balanced"); promoted only if faster there.

Program p covers global tiles [⌊p·T/P⌋, ⌊(p+1)·T/P⌋); tile t belongs to program ⌊((t+1)·P − 1)/T⌋.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvforge.kernels.decode import (
    _attend_range,
    _launch_merge,
    _launch_sizes,
    _load_group_queries,
    _partials,
    _store_partial,
)


@triton.jit
def _owner(t, T, P):
    """The program whose tile range holds global tile t."""
    return ((t + 1) * P - 1) // T


@triton.jit
def _store_neutral(M, L, ACC, slot, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr):
    """A slot no program fills: max -inf, sum 0, values 0 (the merge gives it weight 0)."""
    _store_partial(M, L, ACC, tl.full([GP], float("-inf"), tl.float32), tl.zeros([GP], tl.float32),
                   tl.zeros([GP, DV], tl.float32), slot, G, GP, DV)


@triton.jit
def _balanced_kernel(Q, K, V, OFF, LEN, M, L, ACC, scale, stride_qb, stride_qh, ROWS, P, NS,
                     H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_N: tl.constexpr, RB: tl.constexpr):
    p = tl.program_id(0)
    r_idx = tl.arange(0, RB)
    lens = tl.load(LEN + r_idx, mask=r_idx < ROWS, other=0).to(tl.int64)
    tiles = (lens + BLOCK_N - 1) // BLOCK_N
    ends = tl.cumsum(tiles, 0)  # global tile index just past each segment
    T = tl.sum(tiles, 0)
    if T > 0:
        t0 = (p * T) // P
        t1 = ((p + 1) * T) // P
        first = tl.sum((ends <= t0).to(tl.int32), 0)  # segments wholly before this program's range
        last = tl.sum((ends - tiles < t1).to(tl.int32), 0)  # segments starting before its end
        for r in range(first, last):
            sel = r_idx == r
            n = tl.sum(tl.where(sel, lens, 0), 0)
            nt = tl.sum(tl.where(sel, tiles, 0), 0)
            c = tl.sum(tl.where(sel, ends, 0), 0) - nt  # the segment's first global tile
            if nt > 0:
                lo = tl.maximum(t0, c)
                hi = tl.minimum(t1, c + nt)
                off = tl.load(OFF + r).to(tl.int64)
                q = _load_group_queries(Q, stride_qb, stride_qh, r, H, G, GP, D)
                m_i, l_i, acc = _attend_range(q, K, V, off, (lo - c) * BLOCK_N,
                                              tl.minimum((hi - c) * BLOCK_N, n), scale, D, DV, GP, BLOCK_N)
                p_first = _owner(c, T, P)
                _store_partial(M, L, ACC, m_i, l_i, acc, r * NS + p - p_first, G, GP, DV)
                if hi == c + nt:  # the segment's last piece: neutral partials in its unused slots
                    for sl in range(p - p_first + 1, NS):
                        _store_neutral(M, L, ACC, r * NS + sl, G, GP, DV)
    # empty segments: every slot neutral, written by the program that owns the position where they sit
    for r in range(0, ROWS):
        sel = r_idx == r
        if tl.sum(tl.where(sel, tiles, 0), 0) == 0:
            c = tl.sum(tl.where(sel, ends, 0), 0)
            owner = tl.where(T == 0, 0, _owner(tl.minimum(c, T - 1), tl.maximum(T, 1), P))
            if owner == p:
                for sl in range(0, NS):
                    _store_neutral(M, L, ACC, r * NS + sl, G, GP, DV)


def balanced_slots(max_len: int, total: int, block_n: int, programs: int) -> int:
    """Slots per segment: a segment of ⌈max_len/block_n⌉ tiles spans at most ⌈tiles·P/T⌉ + 1 programs, and
    T ≥ total/block_n tiles in all."""
    tiles = math.ceil(max(max_len, 1) / block_n)
    return min(programs, math.ceil(tiles * programs * block_n / max(total, 1)) + 1)


def decode_attention_balanced(query, k_flat, v_flat, offsets, lengths, scale: float, max_len: int, total: int,
                              block_n: int | None = None, waves: int | None = None, sms: int | None = None,
                              num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """`kvforge.kernels.decode.decode_attention` with balanced programs (CUDA, or Triton's interpreter with
    `sms`)."""
    b, hq, d = query.shape
    rows = offsets.numel()
    h = rows // b
    g = hq // h
    block_n, waves, sms = _launch_sizes(query, block_n, waves, sms)
    programs = waves * sms
    ns = balanced_slots(max_len, total, block_n, programs)
    m, lse, acc, out = _partials(query, v_flat, rows, ns, g)
    gp = max(16, triton.next_power_of_2(g))
    _balanced_kernel[(programs,)](query, k_flat, v_flat, offsets, lengths, m, lse, acc, scale, query.stride(0),
                                  query.stride(1), rows, programs, ns, H=h, G=g, GP=gp, D=d, DV=v_flat.shape[-1],
                                  BLOCK_N=block_n, RB=triton.next_power_of_2(rows), num_warps=num_warps,
                                  num_stages=num_stages)
    return _launch_merge((h, g, block_n, ns, None, m, lse, acc, out), pdl=False)
