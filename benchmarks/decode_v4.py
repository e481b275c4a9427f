"""Prototype (not used by the engine): decode attention in ONE launch whose merge runs all G query heads of a
segment in parallel.

v3 (one launch, removed 2026-11-30) let the last-arriving split program of a segment merge its G heads one
after another: a serial tail that cost more than the launch it saved (benchmarks/NOTES.md). Here the last
program merges the segment's `[NS, G]` partials as one `[CH, GP(, DV)]` tile per chunk, so the tail is one
merge pass, not G. Same split programs as the engine's kernel (`kvforge.kernels.decode._split_part`), same
partials, same inputs and output as `decode_attention`. Measured by `benchmarks/gpu_attention.py` (rows
"v4 one launch"); promoted into `kvforge.kernels.decode` only if it is faster there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvforge.kernels.decode import _plan, _split_part

_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(device: torch.device, rows: int) -> torch.Tensor:
    """Arrival counters, one per segment, zero between calls (the merging program resets its own)."""
    key = (device, rows)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(rows, dtype=torch.int32, device=device)
    return _COUNTERS[key]


@triton.jit
def _one_launch_kernel(Q, K, V, OFF, LEN, M, L, ACC, CNT, OUT, scale, split, stride_qb, stride_qh, stride_ob,
                       stride_oh, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GM: tl.constexpr,
                       D: tl.constexpr, DV: tl.constexpr, NS, BLOCK_N: tl.constexpr, CH: tl.constexpr):
    bh = tl.program_id(0)
    _split_part(Q, K, V, OFF, LEN, M, L, ACC, scale, split, stride_qb, stride_qh, bh, tl.program_id(1), H, G, GP,
                D, DV, NS, BLOCK_N)
    tl.debug_barrier()  # every thread's partial stores happen before the release below
    if tl.atomic_add(CNT + bh, 1, sem="acq_rel", scope="gpu") == NS - 1:
        tl.debug_barrier()  # and every thread's loads of the others' partials after the acquire
        g = tl.arange(0, GM)
        okg = g < G
        dv = tl.arange(0, DV)
        m_run = tl.full([GM], float("-inf"), tl.float32)
        den = tl.zeros([GM], tl.float32)
        acc = tl.zeros([GM, DV], tl.float32)
        for c in range(0, NS, CH):
            s = c + tl.arange(0, CH)
            ok = (s < NS)[:, None] & okg[None, :]
            base = (bh * NS + s)[:, None] * G + g[None, :]  # [CH, GM]
            m = tl.load(M + base, mask=ok, other=float("-inf"), cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, 0))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            keep = tl.exp(m_run - safe)
            w = tl.exp(m - safe[None, :])
            den = den * keep + tl.sum(tl.load(L + base, mask=ok, other=0.0, cache_modifier=".cg") * w, 0)
            part = tl.load(ACC + base[:, :, None] * DV + dv[None, None, :], mask=ok[:, :, None], other=0.0,
                           cache_modifier=".cg")  # [CH, GM, DV]
            acc = acc * keep[:, None] + tl.sum(part * w[:, :, None], 0)
            m_run = m_new
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        b = bh // H
        h = bh % H
        tl.store(OUT + b * stride_ob + (h * G + g)[:, None] * stride_oh + dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=okg[:, None])
        tl.atomic_xchg(CNT + bh, 0)


def decode_attention_one_launch(query, k_flat, v_flat, offsets, lengths, scale: float, max_len: int, total: int,
                                block_n: int | None = None, waves: int | None = None, split: int | None = None,
                                num_warps: int = 4, num_stages: int = 2, sms: int | None = None, ch: int = 16):
    """`kvforge.kernels.decode.decode_attention` in one launch (CUDA, or Triton's interpreter with `sms`)."""
    h, g, block_n, ns, split, m, lse, acc, out = _plan(query, v_flat, offsets, lengths, max_len, total, block_n,
                                                       waves, sms, split)
    rows, d, dv = offsets.numel(), query.shape[-1], v_flat.shape[-1]
    _one_launch_kernel[(rows, ns)](query, k_flat, v_flat, offsets, lengths, m, lse, acc,
                                   _counters(query.device, rows), out, scale, split, query.stride(0),
                                   query.stride(1), out.stride(0), out.stride(1), H=h, G=g,
                                   GP=max(16, triton.next_power_of_2(g)), GM=triton.next_power_of_2(g), D=d, DV=dv,
                                   NS=ns, BLOCK_N=block_n, CH=ch, num_warps=num_warps, num_stages=num_stages)
    return out
