"""Decode attention over *segments*: one query token per row, keys stored per (row, KV head) as segments of a
flat buffer. A dense cache `[B, H_kv, cap, D]` is the special case `offsets = (b·H_kv + h)·cap`, `lengths = n`;
a packed head-varlen cache stores each head's kept entries back to back (no padding to the longest head).

Shapes: `query [B, Hq, D]`, `k_flat [N, D]`, `v_flat [N, Dv]`, `offsets [B·H_kv]` (int64, first entry of each
segment), `lengths [B·H_kv]` (int32/64, entries of each segment). Query head `i` reads KV head `i // G`.
Output `[B, Hq, Dv]`; a segment of length 0 gives zeros.

`decode_attention` runs the Triton kernel on CUDA (flash-decoding: each segment is split along the sequence so
batch-1 long contexts fill the GPU; a second kernel merges the splits) and the torch twin elsewhere.
`decode_attention_ref` is the slow, obviously-correct twin with the same signature.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is present on CUDA machines; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def decode_attention_ref(query, k_flat, v_flat, offsets, lengths, scale: float, max_len: int | None = None):
    """Reference: per segment, softmax(q·Kᵀ·scale)·V in float32, looping over (row, KV head)."""
    b, hq, d = query.shape
    h = offsets.numel() // b
    g = hq // h
    out = torch.zeros(b, hq, v_flat.shape[-1], dtype=torch.float32, device=query.device)
    for bi in range(b):
        for hi in range(h):
            o, n = int(offsets[bi * h + hi]), int(lengths[bi * h + hi])
            if n == 0:
                continue
            k = k_flat[o : o + n].float()
            v = v_flat[o : o + n].float()
            q = query[bi, hi * g : (hi + 1) * g].float()  # [G, D]
            p = torch.softmax(q @ k.T * scale, dim=-1)
            out[bi, hi * g : (hi + 1) * g] = p @ v
    return out.to(query.dtype)


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, OFF, LEN, M, L, ACC, scale, split, stride_qb, stride_qh,
                      H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                      NS, BLOCK_N: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // H
        h = bh % H
        off = tl.load(OFF + bh).to(tl.int64)
        n = tl.load(LEN + bh).to(tl.int32)
        start = s * split
        end = tl.minimum(start + split, n)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None],
                    other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DV], tl.float32)
        for j in range(start, end, BLOCK_N):
            cols = j + tl.arange(0, BLOCK_N)
            ok = cols < end
            rows = off + cols.to(tl.int64)
            k = tl.load(K + rows[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + rows[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        base = bh * NS + s
        tl.store(M + base * GP + g, m_i)
        tl.store(L + base * GP + g, l_i)
        tl.store(ACC + (base * GP + g)[:, None] * DV + dv[None, :], acc)

    @triton.jit
    def _merge_kernel(M, L, ACC, OUT, stride_ob, stride_oh, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                      DV: tl.constexpr, NS):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        g = tl.arange(0, GP)
        dv = tl.arange(0, DV)
        m_max = tl.full([GP], float("-inf"), tl.float32)
        for s in range(NS):
            m_max = tl.maximum(m_max, tl.load(M + (bh * NS + s) * GP + g))
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        den = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DV], tl.float32)
        for s in range(NS):
            base = (bh * NS + s) * GP
            w = tl.exp(tl.load(M + base + g) - m_safe)
            den += tl.load(L + base + g) * w
            acc += tl.load(ACC + (base + g)[:, None] * DV + dv[None, :]) * w[:, None]
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(OUT + b * stride_ob + (h * G + g)[:, None] * stride_oh + dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=(g < G)[:, None])


def _num_splits(rows: int, max_len: int, block_n: int, sms: int) -> tuple[int, int]:
    """Splits per segment so that rows × splits fills the GPU about twice; keys per split, a block multiple."""
    want = max(1, math.ceil(2 * sms / max(rows, 1)))
    ns = max(1, min(want, math.ceil(max(max_len, 1) / block_n)))
    split = math.ceil(max(max_len, 1) / ns / block_n) * block_n
    return math.ceil(max(max_len, 1) / split), split


def decode_attention(query, k_flat, v_flat, offsets, lengths, scale: float, max_len: int | None = None,
                     block_n: int = 64, num_warps: int = 4, num_stages: int = 2):
    """Decode attention over segments (see module docstring). `max_len` (host int, the longest segment)
    avoids a device sync; it is read from `lengths` when omitted."""
    if not query.is_cuda or triton is None:
        return decode_attention_ref(query, k_flat, v_flat, offsets, lengths, scale)
    b, hq, d = query.shape
    rows = offsets.numel()
    h = rows // b
    g = hq // h
    dv = v_flat.shape[-1]
    if max_len is None:
        max_len = int(lengths.max())
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    ns, split = _num_splits(rows, max_len, block_n, sms)
    gp = max(16, triton.next_power_of_2(g))
    m = torch.empty(rows, ns, gp, dtype=torch.float32, device=query.device)
    lse = torch.empty_like(m)
    acc = torch.empty(rows, ns, gp, dv, dtype=torch.float32, device=query.device)
    _split_kernel[(rows, ns)](query, k_flat, v_flat, offsets, lengths, m, lse, acc, scale, split,
                              query.stride(0), query.stride(1), H=h, G=g, GP=gp, D=d, DV=dv, NS=ns,
                              BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(b, hq, dv, dtype=query.dtype, device=query.device)
    _merge_kernel[(rows,)](m, lse, acc, out, out.stride(0), out.stride(1), H=h, G=g, GP=gp, DV=dv, NS=ns,
                           num_warps=4)
    return out


def dense_segments(keys_buffer: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments of a dense buffer `[B, H_kv, cap, D]` whose first `n` entries are valid."""
    b, h, cap, d = keys_buffer.shape
    offsets = torch.arange(b * h, device=keys_buffer.device, dtype=torch.int64) * cap
    lengths = torch.full((b * h,), n, device=keys_buffer.device, dtype=torch.int32)
    return keys_buffer.view(b * h * cap, d), offsets, lengths
