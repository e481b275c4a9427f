"""Decode attention over a KIVI-quantized cache, dequantizing in registers: one query token per row, the keys and
values of each (row, KV head) being `m` coded entries (the layout of `kvforge.quant`) followed by a
full-precision tail of `tail_len` entries. No full-precision copy of the coded part is ever made.

Shapes: `query [B, Hq, D]`; `parts = (kq, ks, kz, vq, vs, vz)` as `quantize_keys(...) + quantize_values(...)`
return them: key codes `[B, H, m, D·bits/8]` uint8 (packed along channels), key scale / minimum
`[B, H, m/group, D]`, value codes `[B, H, m, Dv·bits/8]`, value scale / minimum `[B, H, m, Dv/gv]` with
`gv = value_group(Dv, group)`; `tail_k [B, H, cap, D]`, `tail_v [B, H, cap, Dv]` of which the first `tail_len`
entries are valid (`tail_len` a host int or a 1-element int tensor on the device: then nothing is read on the
host and the call can be captured in a CUDA graph). Query head `i` reads KV head `i // G`. Output `[B, Hq, Dv]`
in the query dtype; softmax(q·kᵀ·scale)·v accumulated in float32.

`quant_decode_attention` runs the Triton kernels on CUDA (flash-decoding like `kvforge.kernels.decode`: each
(row, KV head) sequence of m + cap slots is split so batch-1 long contexts fill the GPU; a program loads each
block of codes once for all G query heads of its group (16-byte loads of packed bytes), unpacks them with
shifts and masks in the registers of the thread that loaded them, and either dequantizes them there (default:
`c·s + z` in fp32, then the cache dtype — the reference's rounding) or, with `fold=True`, folds the scales into
the query (keys) and the probabilities (values) and feeds the codes to fp16 dots; entries at or past m are read
from the tail; the splits are merged by log-sum-exp with decode.py's merge kernel).
`quant_decode_attention_ref` is the slow, obviously-correct twin with the same signature.

Speed (H100, Llama-3.1-8B shapes, benchmarks/NOTES.md): the kernel is bound by instructions (about ten per code
element: unpacking, dequantizing, packing into operands), not by the bytes it reads, so at 128k it runs at
0.9–1.2× the time of the bf16 kernel over the dense cache while reading 3–7× fewer bytes; it is ~35× faster
than dequantizing the cache and running SDPA. Memory, not speed, is what the coded cache buys today.
"""

from __future__ import annotations

import torch

from kvforge.kernels.decode import _num_splits
from kvforge.quant import dequantize_keys, dequantize_values, value_group

try:  # Triton is present on CUDA machines; the CPU path never needs it
    import triton
    import triton.language as tl

    from kvforge.kernels.decode import _merge_kernel
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def quant_decode_attention_ref(query, parts, bits: int, group: int, tail_k, tail_v, tail_len, scale: float):
    """Reference: dequantize the coded part (cache dtype), append the valid tail, float32 softmax attention."""
    kq, ks, kz, vq, vs, vz = parts
    b, hq, d = query.shape
    h = kq.shape[1]
    g = hq // h
    n = int(tail_len)
    keys = torch.cat([dequantize_keys(kq, ks, kz, bits, group, ks.dtype).float(), tail_k[:, :, :n].float()], 2)
    vals = torch.cat([dequantize_values(vq, vs, vz, bits, group, vs.dtype).float(), tail_v[:, :, :n].float()], 2)
    q = query.float().view(b, h, g, d)
    p = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", q, keys) * scale, dim=-1)
    return torch.einsum("bhgn,bhnd->bhgd", p, vals).reshape(b, hq, vals.shape[-1]).to(query.dtype)


if triton is not None:

    @triton.jit
    def _codes(base, t, ok, NB: tl.constexpr, DD: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
               BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
        """Codes `[BLOCK_N, DD]` int32 of the rows `t` of a packed `[*, NB]` uint8 buffer (NB = DD·BITS/8), each
        byte loaded once (16-byte loads). UNPACK 0: the PER codes of a byte are interleaved in registers
        (`tl.interleave` keeps them in the thread that loaded the byte: no data movement); UNPACK 1: shifted
        along a third axis and reshaped (Triton lays that out across threads: slow, kept for comparison)."""
        byte = tl.load(base + t[:, None] * NB + tl.arange(0, NB)[None, :], mask=ok[:, None], other=0).to(tl.int32)
        if PER == 1:
            codes = byte
        elif UNPACK == 0:
            if PER == 2:
                codes = tl.interleave(byte & 15, byte >> 4)
            else:  # (c0, c2), (c1, c3) interleaved, then the pairs: c0 c1 c2 c3 of each byte in order
                codes = tl.interleave(tl.interleave(byte & 3, (byte >> 4) & 3),
                                      tl.interleave((byte >> 2) & 3, byte >> 6))
        else:
            shifts = tl.arange(0, PER) * BITS
            codes = tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), [BLOCK_N, DD])
        return codes

    @triton.jit
    def _as_float(codes):
        """Exact int -> float32 for 0 <= codes < 2**23 without the quarter-rate I2F: 2**23 + c, minus 2**23."""
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _as_half(codes, BITS: tl.constexpr):
        """Codes as fp16 matrix operands 1 + c·2^-BITS, exactly: c goes to the top mantissa bits of 1.0 (one shift
        and one logic op, no conversion instruction); the caller scales by 2^BITS and subtracts the 1s."""
        return ((codes << (10 - BITS)) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit(do_not_specialize=["tail_int"])
    def _quant_split_kernel(Q, KQ, KS, KZ, VQ, VS, VZ, TK, TV, TL, M, L, ACC, scale, m, tail_int, split,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                            stride_vn, NS, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                            DV: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr,
                            GV: tl.constexpr, NGV: tl.constexpr, KR: tl.constexpr, KGATHER: tl.constexpr,
                            BLOCK_N: tl.constexpr, TL_PTR: tl.constexpr, UNPACK: tl.constexpr,
                            FOLD_K: tl.constexpr, FOLD_V: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // H
        h = bh % H
        if TL_PTR:
            tlen = tl.load(TL).to(tl.int32)
        else:
            tlen = tail_int
        start = s * split
        end = tl.minimum(start + split, m + tlen)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        DT = Q.dtype.element_ty
        q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None],
                    other=0.0)
        qf = q.to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DV], tl.float32)
        # coded entries [start, min(end, m)): this (row, head)'s slices of the packed buffers
        row = bh.to(tl.int64)
        kq_b = KQ + row * m * (D * BITS // 8)
        ks_b = KS + row * (m // GROUP) * D
        kz_b = KZ + row * (m // GROUP) * D
        vq_b = VQ + row * m * (DV * BITS // 8)
        vs_b = VS + row * m * NGV
        vz_b = VZ + row * m * NGV
        c_end = tl.minimum(end, m)
        for j in range(start, c_end, BLOCK_N):
            t = j + tl.arange(0, BLOCK_N)
            ok = t < c_end
            kc = _codes(kq_b, t, ok, D * BITS // 8, D, BITS, PER, BLOCK_N, UNPACK)
            if FOLD_K:  # one key group per block: q·k = (q∘s)·c + q·z, the codes straight into an fp16 dot
                kso = (j // GROUP) * D + d
                ks = tl.load(ks_b + kso).to(tl.float32)
                kz = tl.load(kz_b + kso).to(tl.float32)
                qs = tl.clamp(qf * (ks * (1 << BITS))[None, :], -65504.0, 65504.0).to(tl.float16)
                bias = tl.sum(qf * kz[None, :], 1) - tl.sum(qs.to(tl.float32), 1)
                sc = (tl.dot(qs, tl.trans(_as_half(kc, BITS))) + bias[:, None]) * scale
            else:
                if KGATHER:  # key groups not aligned with blocks: per-row scale rows
                    kso = (t // GROUP)[:, None] * D + d[None, :]
                    ks = tl.load(ks_b + kso, mask=ok[:, None], other=0.0).to(tl.float32)
                    kz = tl.load(kz_b + kso, mask=ok[:, None], other=0.0).to(tl.float32)
                elif KR == 1:  # the block lies in one key group
                    kso = (j // GROUP) * D + d
                    ks = tl.load(ks_b + kso).to(tl.float32)[None, :]
                    kz = tl.load(kz_b + kso).to(tl.float32)[None, :]
                else:  # KR whole groups per block: KR scale rows, each broadcast over its GROUP rows
                    gi = j // GROUP + tl.arange(0, KR)
                    kso = gi[:, None] * D + d[None, :]
                    gok = (gi < m // GROUP)[:, None]
                    ks = tl.load(ks_b + kso, mask=gok, other=0.0).to(tl.float32)
                    kz = tl.load(kz_b + kso, mask=gok, other=0.0).to(tl.float32)
                    ks = tl.reshape(tl.broadcast_to(ks[:, None, :], [KR, GROUP, D]), [BLOCK_N, D])
                    kz = tl.reshape(tl.broadcast_to(kz[:, None, :], [KR, GROUP, D]), [BLOCK_N, D])
                k = (_as_float(kc) * ks + kz).to(DT)
                sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vc = _codes(vq_b, t, ok, DV * BITS // 8, DV, BITS, PER, BLOCK_N, UNPACK)
            if FOLD_V:  # one value group per row: p·v = (p∘s)·c + p·z
                vs = tl.load(vs_b + t, mask=ok, other=0.0).to(tl.float32)
                vz = tl.load(vz_b + t, mask=ok, other=0.0).to(tl.float32)
                pd = tl.clamp(p * (vs * (1 << BITS))[None, :], -65504.0, 65504.0).to(tl.float16)
                bias = tl.sum(p * vz[None, :], 1) - tl.sum(pd.to(tl.float32), 1)
                acc = acc * alpha[:, None] + tl.dot(pd, _as_half(vc, BITS)) + bias[:, None]
            else:
                if NGV == 1:
                    vs = tl.load(vs_b + t, mask=ok, other=0.0).to(tl.float32)[:, None]
                    vz = tl.load(vz_b + t, mask=ok, other=0.0).to(tl.float32)[:, None]
                elif UNPACK == 0:
                    vso = t[:, None] * NGV + tl.arange(0, NGV)[None, :]
                    vs = tl.load(vs_b + vso, mask=ok[:, None], other=0.0).to(tl.float32)
                    vz = tl.load(vz_b + vso, mask=ok[:, None], other=0.0).to(tl.float32)
                    vs = tl.reshape(tl.broadcast_to(vs[:, :, None], [BLOCK_N, NGV, GV]), [BLOCK_N, DV])
                    vz = tl.reshape(tl.broadcast_to(vz[:, :, None], [BLOCK_N, NGV, GV]), [BLOCK_N, DV])
                else:
                    vso = t[:, None] * NGV + (dv // GV)[None, :]
                    vs = tl.load(vs_b + vso, mask=ok[:, None], other=0.0).to(tl.float32)
                    vz = tl.load(vz_b + vso, mask=ok[:, None], other=0.0).to(tl.float32)
                v = (_as_float(vc) * vs + vz).to(DT)
                acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
            m_i = m_new
        # tail entries [max(start, m), end): full precision, slot t - m of the tail buffers
        tk_b = TK + b.to(tl.int64) * stride_kb + h * stride_kh
        tv_b = TV + b.to(tl.int64) * stride_vb + h * stride_vh
        for j in range(tl.maximum(start, m), end, BLOCK_N):
            t = j + tl.arange(0, BLOCK_N)
            ok = t < end
            r = t - m
            k = tl.load(tk_b + r[:, None] * stride_kn + d[None, :], mask=ok[:, None], other=0.0).to(DT)
            sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(tv_b + r[:, None] * stride_vn + dv[None, :], mask=ok[:, None], other=0.0).to(DT)
            acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
            m_i = m_new
        base = (bh * NS + s) * G + g  # partial results [rows, NS, G(, DV)], as decode.py's merge reads them
        real = g < G
        tl.store(M + base, m_i, mask=real)
        tl.store(L + base, l_i, mask=real)
        tl.store(ACC + base[:, None] * DV + dv[None, :], acc, mask=real[:, None])


def _plan(bits: int, group: int, d: int, dv: int, block_n: int, fold: bool) -> dict:
    """Compile-time layout of a call: block size, how key scales map onto blocks, what gets folded."""
    per = 8 // bits
    gv = value_group(dv, group)
    pow2 = group & (group - 1) == 0
    if fold and pow2 and 16 <= group < block_n:
        block_n = group  # one key group per block, so its scale can be folded into the query
    aligned = pow2 and (group % block_n == 0 or block_n % group == 0)
    kr = max(1, block_n // group) if aligned else 1
    fold_k = fold and aligned and kr == 1
    fold_v = fold and gv == dv
    return dict(BITS=bits, PER=per, GROUP=group, GV=gv, NGV=dv // gv, KR=kr, KGATHER=not aligned,
                BLOCK_N=block_n, FOLD_K=fold_k, FOLD_V=fold_v)


def _quant_decode_triton(query, parts, bits, group, tail_k, tail_v, tail_len, scale, block_n=64, num_warps=4,
                         num_stages=2, waves=4, fold=False, unpack=0, sms=None):
    kq, ks, kz, vq, vs, vz = (p.contiguous() for p in parts)
    b, hq, d = query.shape
    h, m = kq.shape[1], kq.shape[2]
    g = hq // h
    dv = tail_v.shape[-1]
    if tail_k.stride(-1) != 1:
        tail_k = tail_k.contiguous()
    if tail_v.stride(-1) != 1:
        tail_v = tail_v.contiguous()
    if isinstance(tail_len, torch.Tensor):  # device counter: size the grid for a full tail, read nothing here
        tl_ptr, tail_int, slots = tail_len, 0, tail_k.shape[2]
    else:
        tl_ptr, tail_int, slots = query, int(tail_len), int(tail_len)
    plan = _plan(bits, group, d, dv, block_n, fold)
    if sms is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    ns, split = _num_splits(b * h * (m + slots), m + slots, plan["BLOCK_N"], sms, waves)
    rows = b * h
    gp = max(16, triton.next_power_of_2(g))
    mx = torch.empty(rows, ns, g, dtype=torch.float32, device=query.device)
    lse = torch.empty_like(mx)
    acc = torch.empty(rows, ns, g, dv, dtype=torch.float32, device=query.device)
    _quant_split_kernel[(rows, ns)](
        query, kq, ks, kz, vq, vs, vz, tail_k, tail_v, tl_ptr, mx, lse, acc, scale, m, tail_int, split,
        query.stride(0), query.stride(1), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2), tail_v.stride(0),
        tail_v.stride(1), tail_v.stride(2), ns, H=h, G=g, GP=gp, D=d, DV=dv, TL_PTR=tl_ptr is not query,
        UNPACK=unpack, num_warps=num_warps, num_stages=num_stages, **plan)
    out = torch.empty(b, hq, dv, dtype=query.dtype, device=query.device)
    _merge_kernel[(rows, g)](mx, lse, acc, out, out.stride(0), out.stride(1), ns, H=h, G=g, DV=dv, CH=32,
                             num_warps=4)
    return out


def quant_decode_attention(query, parts, bits: int, group: int, tail_k, tail_v, tail_len, scale: float, *,
                           block_n: int = 64, num_warps: int = 4, num_stages: int = 2, waves: int = 4,
                           fold: bool = False, unpack: int = 0):
    """Decode attention over coded entries + tail (see module docstring): Triton on CUDA, the twin elsewhere.
    Keyword arguments tune the kernel: `fold` folds the scales into the query / probabilities where a block has
    one key group (and a row one value group) instead of dequantizing each element; `unpack` 0 interleaves the
    codes of each loaded byte in registers, 1 unpacks along a third axis (slower layout)."""
    if not query.is_cuda or triton is None:
        return quant_decode_attention_ref(query, parts, bits, group, tail_k, tail_v, tail_len, scale)
    return _quant_decode_triton(query, parts, bits, group, tail_k, tail_v, tail_len, scale, block_n, num_warps,
                                num_stages, waves, fold, unpack)
