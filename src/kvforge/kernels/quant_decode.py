"""Decode attention over a KIVI-quantized cache, reading the codes straight into the tensor cores: one query token
per row, the keys and values of each (row, KV head) being `m` coded entries (the layout of `kvforge.kernels.quantize`)
followed by a full-precision tail of `tail_len` entries. No full-precision copy of the coded part is ever made.

Shapes: `query [B, Hq, D]`; `parts = (kq, ks, kz, vq, vs, vz)` as `quantize_keys(...) + quantize_values(...)`
return them: key codes `[B, H, m, D·bits/8]` uint8 (bit-planes along channels), key scale / minimum
`[B, H, m/group, D]`, value codes `[B, H, m, Dv·bits/8]`, value scale / minimum `[B, H, m, Dv/gv]` with
`gv = value_group(Dv, group)`; `tail_k [B, H, cap, D]`, `tail_v [B, H, cap, Dv]` of which the first `tail_len`
entries are valid (`tail_len` a host int or a 1-element int tensor on the device: then nothing is read on the
host and the call can be captured in a CUDA graph). Query head `i` reads KV head `i // G`. Output `[B, Hq, Dv]`
in the query dtype; softmax(q·kᵀ·scale)·v accumulated in float32.

`quant_decode_attention` runs the Triton kernels on CUDA (flash-decoding like `kvforge.kernels.decode`: each
(row, KV head) sequence of m + cap slots is split so batch-1 long contexts fill the GPU; one program serves the
G query heads of a KV head; entries at or past m are read from the tail; decode.py's merge kernel combines the
splits). How the codes are used, per block of BLOCK_N tokens:
- a byte row of the bit-plane layout holds at bits [k·bits, (k+1)·bits) the codes of the channel run
  [k·nb, (k+1)·nb) (nb = D·bits/8): `byte & mask_k` *is* that plane's codes, already in place, and read as an
  fp16 bit pattern it is the subnormal c·2^(k·bits−24), exact: one AND per two codes (inline PTX, two byte
  permutes per four bytes shared by the planes), no shifts, no int→float conversion, no dequantization;
- keys (per channel, groups of `group` tokens): q·k_t = Σ_c (q_c s_c)·c_tc + Σ_c q_c z_c. q∘s (fp16, plane k
  times 2^(6−k·bits) so that every plane lands in one unit) is the A operand of one `tl.dot` per plane (K = nb)
  into one accumulator; q·z is a float32 row sum. A block holding several key groups stacks the query once per
  group along the tensor-core tile's 16 rows (which a handful of query heads leaves empty anyway), and each
  token takes the rows of its group;
- values (per token, groups of gv channels): Σ_t p_t v_t = Σ_t (p_t s_t)·c_t + Σ_t p_t z_t. Per chunk of
  W = min(nb, gv) channels (one plane, one value group): (p∘s)(fp16) @ codes into its own float32 sum, in the
  unit 2^(k·bits−24), restored once at the end; Σ_t p_t z_t and Σ_t p_t ride on one small dot of p with [z | 1]
  (no row sums besides the softmax max). The probabilities enter as 2^14·p and the value scales times a power
  of two set by the largest scale of the program's entries (one pre-pass over the scales), so the fp16
  operands are normal numbers far from under- or overflow whatever the scales;
- running sums are rescaled and added in float32 outside the tensor cores; a program's share of entries is
  capped (`MAX_SPLIT`: the error grew with it, see there);
- groups that do not fit (keys: `group` not a power of two ≥ 16; values: W < 16) are dequantized per element
  (c·s + z, the cache dtype) and fed to the same dots: slower, same results.
`quant_decode_attention_ref` is the slow, obviously-correct twin with the same signature. Shapes with
nb < 16 or a head dim that is not a power of two go to the twin on CUDA too (not graph-capturable).

Speed against the bf16 kernel over the dense cache and against dequantizing then running SDPA — measured: see
benchmarks/README.md; why the codes are used this way: docs/decisions.md.
"""

from __future__ import annotations

import math

import torch

from kvforge.kernels.decode import launch_merge, num_splits, partials, sm_count
from kvforge.kernels.quantize import dequantize_keys, dequantize_values, value_group

try:  # Triton is present on CUDA machines; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def quant_decode_attention_ref(query, parts, bits: int, group: int, tail_k, tail_v, tail_len, scale: float,
                               dequant_dtype: torch.dtype | None = None):
    """Reference: dequantize the coded part (in the cache dtype, as decoding does, or `dequant_dtype`), append the
    valid tail, softmax attention in float32 (float64 when `dequant_dtype` is float64: an exact reference).
    `tail_len` a device tensor (graph mode): the whole tail is read and slots past the length are masked, so nothing
    waits for the device (a CUDA graph capture refuses a sync)."""
    kq, ks, kz, vq, vs, vz = parts
    b, hq, d = query.shape
    h = kq.shape[1]
    g = hq // h
    acc = torch.float64 if dequant_dtype == torch.float64 else torch.float32
    if isinstance(tail_len, torch.Tensor):
        tk, tv, live = tail_k, tail_v, torch.arange(tail_k.shape[2], device=tail_k.device) < tail_len
    else:
        n = int(tail_len)
        tk, tv, live = tail_k[:, :, :n], tail_v[:, :, :n], None
    keys = torch.cat([dequantize_keys(kq, ks, kz, bits, group, dequant_dtype or ks.dtype).to(acc), tk.to(acc)], 2)
    vals = torch.cat([dequantize_values(vq, vs, vz, bits, group, dequant_dtype or vs.dtype).to(acc), tv.to(acc)], 2)
    q = query.to(acc).view(b, h, g, d)
    scores = torch.einsum("bhgd,bhnd->bhgn", q, keys) * scale
    if live is not None:  # spare slots may hold anything, NaN included: masked out of the scores and the values
        keep = torch.cat([live.new_ones(kq.shape[2]), live])
        scores = scores.masked_fill(~keep, float("-inf"))
        vals = torch.where(keep[:, None], vals, 0)
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgn,bhnd->bhgd", p, vals).reshape(b, hq, vals.shape[-1]).to(query.dtype)


if triton is not None:

    @triton.jit
    def _plane(byte, k: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
        """Codes of plane k of uint8 bytes as the fp16 bit pattern of c·2^(k·BITS−24) (a subnormal, exact). ASM:
        four bytes per inline-PTX call, two byte permutes (shared by the planes) and one LOP3 per two codes; the
        plain-Triton form (for the interpreter) compiles to about twice the instructions."""
        MASK: tl.constexpr = ((1 << BITS) - 1) << (k * BITS)
        if ASM:
            return tl.inline_asm_elementwise(
                f"""{{
                .reg .b32 lo, hi;
                prmt.b32 lo, $2, 0, 0x4140;
                prmt.b32 hi, $2, 0, 0x4342;
                and.b32 $0, lo, {MASK * 0x10001};
                and.b32 $1, hi, {MASK * 0x10001};
                }}""", "=r,=r,r", [byte], dtype=tl.float16, is_pure=True, pack=4)
        return (byte.to(tl.int16) & MASK).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _code(byte, k: tl.constexpr, BITS: tl.constexpr):
        """Plane k of uint8 bytes as float32 codes (the per-element dequantizing paths)."""
        return ((byte.to(tl.int32) >> (k * BITS)) & ((1 << BITS) - 1)).to(tl.float32)

    @triton.jit
    def _col(x, zc, i: tl.constexpr):
        """Column i of x [GP, ZP] as a [GP] vector."""
        return tl.sum(tl.where((zc == i)[None, :], x, 0.0), 1)

    @triton.jit(do_not_specialize=["tail_int", "NS"])
    def _quant_split_kernel(Q, KQ, KS, KZ, VQ, VS, VZ, TK, TV, TL, M, L, ACC, qk_scale, m, tail_int, split,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                            stride_vn, NS, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                            DV: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, GV: tl.constexpr,
                            W: tl.constexpr, ZP: tl.constexpr, BLOCK_N: tl.constexpr,
                            FOLD_K: tl.constexpr, FOLD_V: tl.constexpr, ASM: tl.constexpr, TL_PTR: tl.constexpr):
        PER: tl.constexpr = 8 // BITS  # planes per byte
        NB: tl.constexpr = D // PER  # bytes per key row = channels per key plane
        NBV: tl.constexpr = DV // PER
        NGV: tl.constexpr = DV // GV  # value groups per row
        NCH: tl.constexpr = DV // W  # value chunks: W channels inside one plane (and, folded, one value group)
        KR: tl.constexpr = BLOCK_N // GROUP if FOLD_K and GROUP < BLOCK_N else 1  # key groups per block
        MR: tl.constexpr = max(16, KR * GP)  # rows of the stacked query (a tensor-core tile has 16)
        KUP: tl.constexpr = 6  # key planes scaled to one unit, 2^(KUP - 24): plane k's query times 2^(KUP - k·BITS)
        ZC: tl.constexpr = NGV if FOLD_V else 0  # columns of [z | 1]: z of each value group (folded), then 1
        TAIL_N: tl.constexpr = 32
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // H
        h = bh % H
        if TL_PTR:
            tlen = tl.sum(tl.load(TL + tl.arange(0, 1)), 0).to(tl.int32)  # (a scalar in the interpreter too)
        else:
            tlen = tail_int
        start = s * split
        end = tl.minimum(start + split, m + tlen)
        c_end = tl.minimum(end, m)
        DT = Q.dtype.element_ty
        g = tl.arange(0, GP)
        greal = (g < G)[:, None]
        qrow = Q + b * stride_qb + (h * G + g)[:, None] * stride_qh
        cb = tl.arange(0, NB)
        cw = tl.arange(0, W)
        # folded keys: the query stacked MR / GP times, row r = (block r // GP, head r % GP); block i serves key
        # group i of the block (KR of them; blocks past KR only fill the 16-row tile), each
        # plane times 2^(KUP - k·BITS) so that every plane's dot lands in one unit (and products of small queries
        # and codes stay far from underflow; |q·s| up to 1023 fits fp16)
        kr = tl.arange(0, MR)
        rreal = (kr % GP < G)[:, None]
        qr = Q + b * stride_qb + (h * G + kr % GP)[:, None] * stride_qh
        qp = ()
        for k in tl.static_range(PER):
            if FOLD_K:
                qk = tl.load(qr + k * NB + cb[None, :], mask=rreal, other=0.0).to(tl.float32)
                qp = qp + (qk * (1 << (KUP - k * BITS)),)
            else:
                qp = qp + (tl.load(qrow + k * NB + cb[None, :], mask=greal, other=0.0),)
        tok = tl.arange(0, BLOCK_N)
        zc = tl.arange(0, ZP)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        zl = tl.zeros([GP, ZP], tl.float32)  # Σ_t p_t·[z_t | 1]: value minima per group, softmax sum
        accs = (tl.zeros([GP, W], tl.float32),) * NCH
        row = bh.to(tl.int64)
        kq_b = KQ + row * m * NB
        ks_b = KS + row * (m // GROUP) * D
        kz_b = KZ + row * (m // GROUP) * D
        vq_b = VQ + row * m * NBV
        vs_b = VS + row * m * NGV
        vz_b = VZ + row * m * NGV
        # folded values: the largest value scale of this program's entries sets the power of two vsc that brings
        # p·s·vsc (p <= 2^14 here) to at most 2^14: the fp16 operands stay normal numbers, whatever the scales
        vsc = 1.0
        if FOLD_V:
            smax = tl.zeros([BLOCK_N * NGV], tl.float32)
            for j in range(start, c_end, BLOCK_N):
                o = j * NGV + tl.arange(0, BLOCK_N * NGV)
                smax = tl.maximum(smax, tl.load(vs_b + o, mask=o < c_end * NGV, other=0.0).to(tl.float32))
            vsc = tl.exp2(-tl.ceil(tl.log2(tl.maximum(tl.max(smax, 0), 1e-30))))
        # coded entries [start, c_end)
        for j in range(start, c_end, BLOCK_N):
            t = j + tok
            ok = (t < c_end)[:, None]
            kb = tl.load(kq_b + t[:, None] * NB + cb[None, :], mask=ok, other=0)
            if FOLD_K:  # scales into the stacked query, codes straight into the dots; one row block per group
                kgi = j // GROUP + tl.minimum(kr // GP, KR - 1)  # key group of each stacked row
                kso = kgi[:, None] * D + cb[None, :]
                kin = (kgi < m // GROUP)[:, None]
                qz = tl.zeros([MR, NB], tl.float32)
                sr = tl.zeros([MR, BLOCK_N], tl.float32)
                for k in tl.static_range(PER):
                    ks = tl.load(ks_b + kso + k * NB, mask=kin, other=0.0).to(tl.float32)
                    kz = tl.load(kz_b + kso + k * NB, mask=kin, other=0.0).to(tl.float32)
                    qs = tl.clamp(qp[k] * ks, -65504.0, 65504.0).to(tl.float16)
                    qz += qp[k] * (kz * (2.0 ** (k * BITS - KUP)))  # q·z, the query's plane factor undone
                    sr = tl.dot(qs, tl.trans(_plane(kb, k, BITS, ASM)), sr)
                sr = sr * (2.0 ** (24 - KUP)) + tl.sum(qz, 1)[:, None]
                if MR == GP:
                    sc = sr
                else:  # token t takes the row block of its key group
                    own = (kr // GP)[:, None] == (tok // GROUP)[None, :]
                    sc = tl.sum(tl.reshape(tl.where(own, sr, 0.0), [MR // GP, GP, BLOCK_N]), 0)
                sc = (sc * qk_scale).to(tl.float32)
            else:  # per-element dequantization, key groups gathered per token
                sc = tl.zeros([GP, BLOCK_N], tl.float32)
                for k in tl.static_range(PER):
                    kso = (t // GROUP)[:, None] * D + k * NB + cb[None, :]
                    ks = tl.load(ks_b + kso, mask=ok, other=0.0).to(tl.float32)
                    kz = tl.load(kz_b + kso, mask=ok, other=0.0).to(tl.float32)
                    sc = tl.dot(qp[k], tl.trans((_code(kb, k, BITS) * ks + kz).to(DT)), sc)
                sc = (sc * qk_scale).to(tl.float32)
            sc = tl.where(tl.trans(ok), sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - (m_new - 14.0)[:, None])  # 2^14 times the probabilities: fp16 keeps them normal
            m_i = m_new
            # [z | 1]: one small dot gives Σ p·z of each value group and Σ p
            zm = tl.load(vz_b + t[:, None] * NGV + zc[None, :], mask=ok & (zc < ZC)[None, :], other=0.0)
            zm = tl.where((zc == ZC)[None, :], 1.0, tl.clamp(zm.to(tl.float32), -65504.0, 65504.0))
            # running sums: rescaled and added outside the tensor cores (accumulating a small block into a large
            # running sum there loses its low bits)
            zl = zl * alpha[:, None] + tl.dot(p.to(tl.float16), zm.to(tl.float16))
            new = ()
            for ch in tl.static_range(NCH):
                if ch == 0 or W < NBV:  # W == nb: the chunks are the planes of one byte row, loaded once
                    vb = tl.load(vq_b + t[:, None] * NBV + ch * W % NBV + cw[None, :], mask=ok, other=0)
                if FOLD_V:  # the token's scale (of this chunk's value group) into the probabilities
                    if ch * W % GV == 0:  # a new value group
                        vs = tl.load(vs_b + t * NGV + ch * W // GV, mask=t < c_end, other=0.0)
                        ps = (p * (vs.to(tl.float32) * vsc)[None, :]).to(tl.float16)  # <= 2^14
                    pv = tl.dot(ps, _plane(vb, ch * W // NBV, BITS, ASM))
                else:  # per-element dequantization, value groups gathered per channel
                    vso = t[:, None] * NGV + (ch * W + cw)[None, :] // GV
                    vs = tl.load(vs_b + vso, mask=ok, other=0.0).to(tl.float32)
                    vz = tl.load(vz_b + vso, mask=ok, other=0.0).to(tl.float32)
                    pv = tl.dot(p.to(DT), (_code(vb, ch * W // NBV, BITS) * vs + vz).to(DT))
                new = new + (accs[ch] * alpha[:, None] + pv,)
            accs = new
        # back to plain units: probabilities were 2^14 too large, folded codes in units 2^(k·bits - 24) / vsc
        zl = zl * (2.0 ** -14)
        l_i = _col(zl, zc, ZC)
        new = ()
        for ch in tl.static_range(NCH):
            if FOLD_V:
                unit = (2.0 ** (10 - ch * W // NBV * BITS)) / vsc
                new = new + (accs[ch] * unit + _col(zl, zc, ch * W // GV)[:, None],)
            else:
                new = new + (accs[ch] * (2.0 ** -14),)
        accs = new
        # tail entries [max(start, m), end): full precision, slot t - m of the tail buffers (small blocks, not
        # pipelined: its shared-memory buffers would otherwise cap the programs per SM of the whole kernel)
        d = tl.arange(0, D)
        q = tl.load(qrow + d[None, :], mask=greal, other=0.0)
        tk_b = TK + b.to(tl.int64) * stride_kb + h * stride_kh
        tv_b = TV + b.to(tl.int64) * stride_vb + h * stride_vh
        for j in tl.range(tl.maximum(start, m), end, TAIL_N, num_stages=1):
            t = j + tl.arange(0, TAIL_N)
            ok = (t < end)[:, None]
            r = t - m
            kt = tl.load(tk_b + r[:, None] * stride_kn + d[None, :], mask=ok, other=0.0).to(DT)
            sc = tl.where(tl.trans(ok), (tl.dot(q, tl.trans(kt)) * qk_scale).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            new = ()
            for ch in tl.static_range(NCH):
                vt = tl.load(tv_b + r[:, None] * stride_vn + ch * W + cw[None, :], mask=ok, other=0.0).to(DT)
                new = new + (accs[ch] * alpha[:, None] + tl.dot(p.to(DT), vt),)
            accs = new
        base = (bh * NS + s) * G + g  # partial results [rows, NS, G(, DV)], as decode.py's merge reads them
        real = g < G
        tl.store(M + base, m_i * 0.6931471805599453, mask=real)  # the merge works in natural-log units
        tl.store(L + base, l_i, mask=real)
        for ch in tl.static_range(NCH):
            tl.store(ACC + base[:, None] * DV + ch * W + cw[None, :], accs[ch], mask=real[:, None])


# Entries per program at most. Measured (see docs/decisions.md): the error against an exact float64
# reference grows with a program's share, 2.3e-3 at 1024 entries, 3.6e-3 at 2048, 7.2e-3 at 4096 and 1e-1 for
# one program over 128k (2-bit; 4-bit about half), independent of the block size — most likely the tensor
# cores' accumulation of the value-code sums Σ (p·s)·c and Σ p·z, which cancel each other to a far smaller
# output. Capping the share keeps it at the 2048 level; batch-1 calls at the default waves are not affected.
MAX_SPLIT = 2048


def _plan(bits: int, group: int, d: int, dv: int, block_n: int | None, asm: bool = True) -> dict | None:
    """Compile-time layout of a call: block size, which side folds its scales; None if only the twin fits
    (planes under 16 bytes, head dims that are not powers of two)."""
    per = 8 // bits
    nb, nbv = d // per, dv // per
    if min(nb, nbv) < 16 or d & (d - 1) or dv & (dv - 1):
        return None
    gv = value_group(dv, group)
    fold_k = group >= 16 and group & (group - 1) == 0
    block_n = block_n or 128
    w = min(nbv, gv)
    fold_v = w >= 16
    zp = max(16, 1 << (dv // gv if fold_v else 0).bit_length())  # [z | 1] columns, a power of two
    return dict(BITS=bits, GROUP=group, GV=gv, W=w if fold_v else nbv, ZP=zp, BLOCK_N=block_n,
                FOLD_K=fold_k, FOLD_V=fold_v, ASM=asm)


def _quant_decode_triton(query, parts, bits, group, tail_k, tail_v, tail_len, scale, block_n=None, num_warps=4,
                         num_stages=3, waves=4, asm=True, sms=None):
    kq, ks, kz, vq, vs, vz = (p.contiguous() for p in parts)
    b, hq, d = query.shape
    h, m = kq.shape[1], kq.shape[2]
    g = hq // h
    dv = tail_v.shape[-1]
    plan = _plan(bits, group, d, dv, block_n, asm)
    if plan is None:
        return quant_decode_attention_ref(query, parts, bits, group, tail_k, tail_v, tail_len, scale)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if tail_k.stride(-1) != 1:
        tail_k = tail_k.contiguous()
    if tail_v.stride(-1) != 1:
        tail_v = tail_v.contiguous()
    if isinstance(tail_len, torch.Tensor):  # device counter: size the grid for a full tail, read nothing here
        tl_ptr, tail_int, slots = tail_len, 0, tail_k.shape[2]
    else:
        tl_ptr, tail_int, slots = query, int(tail_len), int(tail_len)
    ns, split = num_splits(b * h * (m + slots), m + slots, plan["BLOCK_N"], sms or sm_count(query.device), waves)
    if split > MAX_SPLIT:  # long shares lose precision (see MAX_SPLIT): more programs, merged as usual
        split = max(MAX_SPLIT, plan["BLOCK_N"])
        ns = -(-(m + slots) // split)
    mx, lse, acc, out = partials(query, tail_v, b * h, ns, g)
    _quant_split_kernel[(b * h, ns)](
        query, kq, ks, kz, vq, vs, vz, tail_k, tail_v, tl_ptr, mx, lse, acc, scale / math.log(2), m, tail_int,
        split, query.stride(0), query.stride(1), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        tail_v.stride(0), tail_v.stride(1), tail_v.stride(2), ns, H=h, G=g, GP=triton.next_power_of_2(g), D=d,
        DV=dv, TL_PTR=tl_ptr is not query, num_warps=num_warps, num_stages=num_stages, **plan)
    return launch_merge(mx, lse, acc, out, h, pdl=False)  # the dense path's merge


def quant_decode_attention(query, parts, bits: int, group: int, tail_k, tail_v, tail_len, scale: float, *,
                           block_n: int | None = None, num_warps: int = 4, num_stages: int = 3, waves: int = 4):
    """Decode attention over coded entries + tail (see module docstring): Triton on CUDA, the twin elsewhere.
    Keyword arguments tune the kernel: `block_n` tokens per block (default 128; a power of two: key groups
    stack in it or it lies in one), `num_warps`, `num_stages` (software pipelining of the coded loop), `waves`
    (programs ≈ waves × SMs)."""
    if not query.is_cuda or triton is None:
        return quant_decode_attention_ref(query, parts, bits, group, tail_k, tail_v, tail_len, scale)
    return _quant_decode_triton(query, parts, bits, group, tail_k, tail_v, tail_len, scale, block_n, num_warps,
                                num_stages, waves)
