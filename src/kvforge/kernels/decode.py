"""Decode attention over *segments*: one query token per row, keys stored per (row, KV head) as segments of a
flat buffer. A dense cache `[B, H_kv, cap, D]` is the special case `offsets = (b·H_kv + h)·cap`, `lengths = n`;
a packed head-varlen cache stores each head's kept entries back to back (no padding to the longest head).

Shapes: `query [B, Hq, D]`, `k_flat [N, D]`, `v_flat [N, Dv]`, `offsets [B·H_kv]` (int64, first entry of each
segment), `lengths [B·H_kv]` (int32/64, entries of each segment). Query head `i` reads KV head `i // G`.
Output `[B, Hq, Dv]`; a segment of length 0 gives zeros.

`decode_attention` runs the Triton kernel on CUDA (flash-decoding: each segment is split along the sequence so
batch-1 long contexts fill the GPU; a second kernel merges the splits) and `decode_attention_gather` elsewhere
(vectorised torch: segments gathered into a padded block, no host reads, so `torch.compile` traces it).
`decode_attention_ref` is the slow, obviously-correct twin of both, with the same signature.
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton is present on CUDA machines; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
try:  # programmatic dependent launch (Triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - CPU-only installs and older Triton
    gdc_wait = gdc_launch_dependents = None


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


def decode_attention_gather(query, k_flat, v_flat, offsets, lengths, scale: float, max_len: int):
    """Torch path: gather every segment into `[B·H_kv, max_len, D]` (masked past its length), softmax in
    float32. `max_len` (host int) bounds the longest segment."""
    b, hq, d = query.shape
    rows = offsets.numel()
    g = hq // (rows // b)
    t = torch.arange(max_len, device=query.device)
    ok = t[None, :] < lengths[:, None]  # [rows, L]
    idx = torch.where(ok, offsets[:, None] + t[None, :], 0)
    k = k_flat[idx].float()  # [rows, L, D]
    v = v_flat[idx].float()
    s = (query.reshape(rows, g, d).float() @ k.transpose(1, 2)) * scale  # [rows, G, L]
    p = torch.softmax(s.masked_fill(~ok[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ v).reshape(b, hq, -1).to(query.dtype)


_DEVICE: dict[int, tuple[int, int, int, bool]] = {}


def _device_facts(device: torch.device) -> tuple[int, int, int, bool]:
    """(SMs, block_n, waves, PDL) of a CUDA device, cached (a plain dict read, which `torch.compile` traces).
    128-key tiles and 3 waves where a program may use >= 160 KiB of shared memory (H100/H200/A100 class; measured:
    see docs/decisions.md), else 64-key tiles and 4 waves; programmatic dependent launch from compute
    capability 9 (Hopper) on, where Triton has it."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE:
        props = torch.cuda.get_device_properties(idx)
        big = getattr(props, "shared_memory_per_block_optin", 0) >= 160 * 1024
        pdl = props.major >= 9 and gdc_wait is not None
        _DEVICE[idx] = (props.multi_processor_count, *((128, 3) if big else (64, 4)), pdl)
    return _DEVICE[idx]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _device_facts(device)[0]


if triton is not None:

    @triton.jit
    def _attend_range(q, K, V, off, start, end, scale, D: tl.constexpr, DV: tl.constexpr, GP: tl.constexpr,
                      BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        """Keys start..end-1 of the segment at `off`, for the `[GP, D]` queries `q` of one KV head's group: the
        running max, sum and weighted values (each K/V tile loaded once for all G query heads). IEEE (fp32 K/V): the
        dots in full fp32 (`input_precision="ieee"`; Triton's default for fp32 operands is TF32, 10-bit mantissas,
        which put a tiny fp32 model's captured logits 3e-2 from eager ones on an H100, against 1e-5 with it)."""
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DV], tl.float32)
        for j in range(start, end, BLOCK_N):
            cols = j + tl.arange(0, BLOCK_N)
            ok = cols < end
            rows = off + cols.to(tl.int64)
            k = tl.load(K + rows[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = (sc * scale).to(tl.float32)  # fp32 even when a compiler passes fp64
            sc = tl.where(ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + rows[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _store_partial(M, L, ACC, m_i, l_i, acc, slot, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr):
        """Partial results of one (segment, split) slot into `[rows, NS, G(, DV)]`: only the real group rows."""
        g = tl.arange(0, GP)
        base = slot * G + g
        real = g < G
        tl.store(M + base, m_i, mask=real)
        tl.store(L + base, l_i, mask=real)
        tl.store(ACC + base[:, None] * DV + tl.arange(0, DV)[None, :], acc, mask=real[:, None])

    @triton.jit
    def _load_group_queries(Q, stride_qb, stride_qh, bh, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                            D: tl.constexpr):
        """The G query heads reading KV head bh % H of row bh // H, padded to GP rows: `[GP, D]`."""
        g = tl.arange(0, GP)
        return tl.load(Q + (bh // H) * stride_qb + ((bh % H) * G + g)[:, None] * stride_qh + tl.arange(0, D)[None, :],
                       mask=(g < G)[:, None], other=0.0)

    @triton.jit
    def _split_kernel(Q, K, V, OFF, LEN, M, L, ACC, scale, split, stride_qb, stride_qh,
                      H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                      NS, BLOCK_N: tl.constexpr, PDL: tl.constexpr, IEEE: tl.constexpr):
        """Program (segment bh, split s): the split's partial results (`_attend_range`) into slot (bh, s).
        PDL (programmatic dependent launch, Hopper+): the program may start while the previous kernel finishes;
        it waits for that kernel's writes before its first load, and lets the merge kernel be scheduled at once
        (the merge waits for this kernel's completion)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        bh = tl.program_id(0)
        s = tl.program_id(1)
        off = tl.load(OFF + bh).to(tl.int64)
        n = tl.load(LEN + bh).to(tl.int32)
        start = s * split
        q = _load_group_queries(Q, stride_qb, stride_qh, bh, H, G, GP, D)
        m_i, l_i, acc = _attend_range(q, K, V, off, start, tl.minimum(start + split, n), scale, D, DV, GP, BLOCK_N,
                                      IEEE)
        _store_partial(M, L, ACC, m_i, l_i, acc, bh * NS + s, G, GP, DV)

    @triton.jit
    def _merge_kernel(M, L, ACC, OUT, stride_ob, stride_oh, NS, H: tl.constexpr, G: tl.constexpr,
                      DV: tl.constexpr, CH: tl.constexpr, PDL: tl.constexpr):
        """Program (segment bh, query head gi): its NS partials merged CH at a time with a running max."""
        if PDL:  # as in the split kernel: wait for the partials, let the next kernel be scheduled
            gdc_wait()
            gdc_launch_dependents()
        bh = tl.program_id(0)
        gi = tl.program_id(1)
        b = bh // H
        h = bh % H
        dv = tl.arange(0, DV)
        m_run = tl.full([1], float("-inf"), tl.float32)
        den = tl.zeros([1], tl.float32)
        acc = tl.zeros([DV], tl.float32)
        for c in range(0, NS, CH):
            s = c + tl.arange(0, CH)
            ok = s < NS
            base = (bh * NS + s) * G + gi
            m = tl.load(M + base, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m_run, tl.max(m, 0))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            keep = tl.exp(m_run - safe)
            w = tl.exp(m - safe)
            den = den * keep + tl.sum(tl.load(L + base, mask=ok, other=0.0) * w, 0)
            part = tl.load(ACC + base[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
            acc = acc * keep + tl.sum(part * w[:, None], 0)
            m_run = m_new
        out = acc / tl.where(den > 0, den, 1.0)
        tl.store(OUT + b * stride_ob + (h * G + gi) * stride_oh + dv, out.to(OUT.dtype.element_ty))


def num_splits(total: int, max_len: int, block_n: int, sms: int, waves: int,
                split: int | None = None) -> tuple[int, int]:
    """Keys per split (a block multiple) sized from the *total* entries so the busy programs fill the GPU
    `waves` times even when heads are ragged; splits per segment cover the longest one (shorter segments'
    extra programs exit at once). An explicit `split` (any positive count: a split's last tile is masked) is
    taken as given."""
    if split is None:
        per_program = math.ceil(max(total, 1) / (waves * sms))
        split = max(block_n, math.ceil(per_program / block_n) * block_n)
    return max(1, math.ceil(max(max_len, 1) / split)), split


def _launch_sizes(query, block_n, waves, sms) -> tuple[int, int, int]:
    """(keys per tile, waves, SMs): the given ones, else the device's (`_device_facts`; 64 x 4 off CUDA)."""
    if block_n is None or waves is None:
        dflt = _device_facts(query.device)[1:3] if query.is_cuda else (64, 4)
        block_n, waves = block_n or dflt[0], waves or dflt[1]
    return block_n, waves, sms or sm_count(query.device)


def partials(query, v_flat, rows: int, ns: int, g: int):
    """Buffers of a split launch: m, l `[rows, NS, G]`, acc `[rows, NS, G, Dv]` (float32) and the output
    `[B, Hq, Dv]`."""
    m = torch.empty(rows, ns, g, dtype=torch.float32, device=query.device)
    acc = torch.empty(rows, ns, g, v_flat.shape[-1], dtype=torch.float32, device=query.device)
    out = torch.empty(*query.shape[:2], v_flat.shape[-1], dtype=query.dtype, device=query.device)
    return m, torch.empty_like(m), acc, out


def _plan(query, v_flat, offsets, lengths, max_len, total, block_n, waves, sms, split):
    """What the split and merge launches need: (KV heads H, group G, tile, splits per segment, keys per split,
    and the `partials` buffers m, l, acc, out)."""
    rows = offsets.numel()
    h = rows // query.shape[0]
    g = query.shape[1] // h
    max_len = int(lengths.max()) if max_len is None else max_len
    total = int(lengths.sum()) if total is None else total
    block_n, waves, sms = _launch_sizes(query, block_n, waves, sms)
    ns, split = num_splits(total, max_len, block_n, sms, waves, split)
    return h, g, block_n, ns, split, *partials(query, v_flat, rows, ns, g)


def decode_attention(query, k_flat, v_flat, offsets, lengths, scale: float, max_len: int | None = None,
                     total: int | None = None, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int = 2, waves: int | None = None, sms: int | None = None,
                     split: int | None = None, pdl: bool | None = None):
    """Decode attention over segments (see module docstring). `max_len` and `total` (host ints: the longest
    segment and the sum of lengths) avoid a device sync; they are read from `lengths` when omitted. `block_n`,
    `waves` default to the device's (`_device_facts`); `sms` overrides the device's count (interpreter tests);
    `split` fixes the keys per program (default: from `total` and `waves`, `num_splits`); `pdl` launches both
    kernels with programmatic dependent launch (default: where the device has it, compute capability >= 9, and
    not inside `torch.compile`, whose kernel analysis cannot read the launch-control instructions and would
    then treat every input as written)."""
    if split is not None and split < 1:
        raise ValueError(f"split={split}: must be a positive number of keys per program")
    if (not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1") or triton is None:
        return decode_attention_gather(query, k_flat, v_flat, offsets, lengths, scale,
                                       int(lengths.max()) if max_len is None else max_len)
    plan = _plan(query, v_flat, offsets, lengths, max_len, total, block_n, waves, sms, split)
    can_pdl = query.is_cuda and _device_facts(query.device)[3]
    if pdl and not can_pdl:
        raise ValueError("pdl=True needs a CUDA device of compute capability >= 9 and Triton >= 3.3; this is "
                         f"{torch.cuda.get_device_name(query.device) if query.is_cuda else query.device}")
    if pdl is None:
        pdl = can_pdl and not torch.compiler.is_compiling()
    _launch_split(plan, query, k_flat, v_flat, offsets, lengths, scale, num_warps, num_stages, pdl)
    h, m, lse, acc, out = plan[0], *plan[5:]
    return launch_merge(m, lse, acc, out, h, pdl)


def _launch_split(plan, query, k_flat, v_flat, offsets, lengths, scale, num_warps, num_stages, pdl):
    """The split kernel of a `_plan`: partials into its m, l, acc buffers."""
    h, g, block_n, ns, split, m, lse, acc, _ = plan
    extra = {"launch_pdl": True} if pdl else {}
    _split_kernel[(offsets.numel(), ns)](query, k_flat, v_flat, offsets, lengths, m, lse, acc, scale, split,
                                        query.stride(0), query.stride(1), H=h, G=g,
                                        GP=max(16, triton.next_power_of_2(g)), D=query.shape[-1],
                                        DV=v_flat.shape[-1], NS=ns, BLOCK_N=block_n, PDL=pdl,
                                        IEEE=k_flat.dtype == torch.float32,
                                        num_warps=num_warps, num_stages=num_stages, **extra)


def launch_merge(m, lse, acc, out, h: int, pdl: bool) -> torch.Tensor:
    """The merge kernel: partials `m, lse [rows, NS, G]`, `acc [rows, NS, G, Dv]` (from `partials`) into `out`
    `[B, Hq, Dv]`, up to 64 splits per pass (one pass for the splits of a 128k call at the default launch
    sizes). Serves the split kernel here and the quantized one (`kvforge.kernels.quant_decode`)."""
    rows, ns, g = m.shape
    extra = {"launch_pdl": True} if pdl else {}
    _merge_kernel[(rows, g)](m, lse, acc, out, out.stride(0), out.stride(1), ns, H=h, G=g, DV=acc.shape[-1],
                             CH=min(64, triton.next_power_of_2(ns)), PDL=pdl, num_warps=4, **extra)
    return out


def dense_segments(keys_buffer: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments of a dense buffer `[B, H_kv, cap, D]` whose first `n` entries are valid."""
    b, h, cap, d = keys_buffer.shape
    offsets = torch.arange(b * h, device=keys_buffer.device, dtype=torch.int64) * cap
    lengths = torch.full((b * h,), n, device=keys_buffer.device, dtype=torch.int32)
    return keys_buffer.view(b * h * cap, d), offsets, lengths


@torch.library.custom_op("kvforge::dense_decode_attention", mutates_args=())
def dense_decode_attention(query: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, offsets: torch.Tensor,
                           lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """`decode_attention` over equal-capacity segments (a dense layer's buffer `[B·H_kv·cap, D]`, `offsets` its
    B·H_kv segment starts), as one operator that `torch.compile` calls without tracing into it: the longest segment
    and the total (`cap`, `B·H_kv·cap`) are read from the shapes at run time, so a compiled decode step whose
    buffers' length is marked dynamic depends on no KV length and one compilation serves every context length
    (`kvforge.cache.graphs.GraphDecoder`). query `[B, Hq, Dk]` → `[B, Hq, Dv]`."""
    total = k_flat.shape[0]
    return decode_attention(query, k_flat, v_flat, offsets, lengths, scale, max_len=total // offsets.numel(),
                            total=total)


@dense_decode_attention.register_fake
def _dense_decode_attention_fake(query, k_flat, v_flat, offsets, lengths, scale):
    return query.new_empty(*query.shape[:2], v_flat.shape[-1])
