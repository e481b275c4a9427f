"""Window attention summed over its queries, without the probabilities: what SnapKV, TOVA and the merging presses
score entries by.

`window_colsum(query, keys, window, scale)` = Σ over the last `window` queries of softmax(q·Kᵀ·scale), float32,
`[B, H_kv, G, n]`, for a plain prefill (no padding, bottom-right causal: window query i, at position n − w + i,
sees entries 0 … n − w + i). Shapes: `query [B, Hq, q, D]` (the window is its last `window` rows),
`keys [B, H_kv, n, D]`, query head `i` reads KV head `i // G`.

The torch form materialises the `[B, Hq, w, n]` probabilities: at 128k context and a 64-query window that is 1 GB
of float32 per layer, written by a softmax that reads its input three times (38 of SnapKV's 92 ms at 128k on an
H100). The Triton form reads the keys twice and writes only the sums: pass 1 finds each window query's
log-sum-exp over splits of the entries (merged in torch), pass 2 sums exp(s − lse) over the window queries of each
tile of entries. Its logits stay in float32 (the torch form rounds them to the keys' dtype).
`window_colsum_ref` is the slow, obviously-correct twin: float32 throughout.
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


def window_colsum_ref(query: torch.Tensor, keys: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Float32 reference: the window's probabilities (bottom-right causal), summed over the window queries."""
    b, hq, q, d = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g, w = hq // h, min(window, q, n)
    qw = query[:, :, q - w :].float().reshape(b, h, g, w, d)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", qw, keys.float()) * scale
    hidden = torch.ones(w, n, dtype=torch.bool, device=query.device).triu_(n - w + 1)
    probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
    return probs.sum(3)


def can_fuse(query: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether `window_colsum` runs the Triton kernels here: CUDA tensors (or any, under Triton's interpreter,
    `TRITON_INTERPRET=1`), Triton present, a query head count that is a multiple of the KV heads, one dtype."""
    on_device = (query.is_cuda and keys.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and query.dtype == keys.dtype and query.shape[1] % keys.shape[1] == 0


if triton is not None:

    @triton.jit
    def _window_queries(Q, bh, HQ, G, sqb, sqh, sqt, sqd, q_len, w, D, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program `bh` = (row, query head): its row b, KV head, window row and dim indices, and the window's
        queries `[BLOCK_W, BLOCK_D]` (zeros past the window and the head dim)."""
        b = bh // HQ
        hq = bh % HQ
        rows = tl.arange(0, BLOCK_W)
        dims = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * sqb + hq * sqh + (q_len - w + rows)[:, None] * sqt + dims[None, :] * sqd,
                    mask=(rows[:, None] < w) & (dims[None, :] < D), other=0.0)
        return b, hq // G, rows, dims, q

    @triton.jit
    def _tile_logits(q, K, b, hk, cols, end, skb, skh, skn, skd, dims, D, scale_log2, IEEE: tl.constexpr):
        """The window's logits over entries `cols` (those at or past `end` read as zeros), in log2 units, float32
        `[BLOCK_W, BLOCK_N]`. IEEE (float32 inputs): true float32 products (Triton's default rounds them to TF32)."""
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + dims[None, :] * skd,
                    mask=(cols[:, None] < end) & (dims[None, :] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        return s * scale_log2

    @triton.jit
    def _lse_kernel(Q, K, M, L, sqb, sqh, sqt, sqd, skb, skh, skn, skd, HQ, G, q_len, n, w, D, split,
                    n_splits, scale_log2, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    IEEE: tl.constexpr):
        """Per (row, query head, split of the entries): running max and sum of exp2 of the window's logits."""
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b, hk, rows, dims, q = _window_queries(Q, bh, HQ, G, sqb, sqh, sqt, sqd, q_len, w, D, BLOCK_W, BLOCK_D)
        m = tl.full((BLOCK_W,), float("-inf"), tl.float32)
        acc = tl.zeros((BLOCK_W,), tl.float32)
        start = sp * split
        end = tl.minimum(start + split, n)
        for s0 in range(0, split, BLOCK_N):  # `split` is a multiple of BLOCK_N; the tiles past `end` are masked
            cols = start + s0 + tl.arange(0, BLOCK_N)
            s = _tile_logits(q, K, b, hk, cols, end, skb, skh, skn, skd, dims, D, scale_log2, IEEE)
            visible = (cols[None, :] < end) & (cols[None, :] - (n - w) <= rows[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m = m_new
        out = (bh * n_splits + sp) * BLOCK_W + rows
        tl.store(M + out, m)
        tl.store(L + out, acc)

    @triton.jit
    def _colsum_kernel(Q, K, LSE, OUT, sqb, sqh, sqt, sqd, skb, skh, skn, skd, HQ, G, q_len, n, w, D, scale_log2,
                       BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """Per (row, query head, tile of entries): Σ over the window queries of exp2(s − lse)."""
        bh = tl.program_id(0)
        tile = tl.program_id(1)
        b, hk, rows, dims, q = _window_queries(Q, bh, HQ, G, sqb, sqh, sqt, sqd, q_len, w, D, BLOCK_W, BLOCK_D)
        lse = tl.load(LSE + bh * BLOCK_W + rows)  # +inf past the window: those rows add exp2(-inf) = 0
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _tile_logits(q, K, b, hk, cols, n, skb, skh, skn, skd, dims, D, scale_log2, IEEE)
        visible = (cols[None, :] < n) & (cols[None, :] - (n - w) <= rows[:, None]) & (rows[:, None] < w)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        tl.store(OUT + bh * n + cols, tl.sum(p, 0), mask=cols < n)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def window_colsum(query: torch.Tensor, keys: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """`window_colsum_ref` with the Triton kernels on CUDA (`can_fuse`), the reference elsewhere. `[B, H_kv, G, n]`
    float32."""
    if not can_fuse(query, keys):
        return window_colsum_ref(query, keys, window, scale)
    b, hq, q, d = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g, w = hq // h, min(window, q, n)
    block_w = max(16, triton.next_power_of_2(w))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if block_w * block_d > 64 * 128 else 128
    tiles = triton.cdiv(n, block_n)
    n_splits = max(1, min(tiles, triton.cdiv(4 * _sms(query.device), b * hq)))  # about 4 programs per SM
    split = triton.cdiv(tiles, n_splits) * block_n
    n_splits = triton.cdiv(n, split)
    m = torch.empty(b * hq, n_splits, block_w, dtype=torch.float32, device=query.device)
    acc = torch.empty_like(m)
    scale_log2 = scale * math.log2(math.e)
    ieee = query.dtype == torch.float32
    args = (*query.stride(), *keys.stride(), hq, g, q, n, w, d)
    _lse_kernel[(b * hq, n_splits)](query, keys, m, acc, *args, split, n_splits, scale_log2,
                                    BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee)
    top = m.amax(1, keepdim=True)  # [B·Hq, 1, W]; finite for every window row (each sees its own entry)
    total = (acc * torch.exp2(m - top.nan_to_num(neginf=0.0))).sum(1)
    lse = (top[:, 0] + torch.log2(total)).contiguous()
    lse[:, w:] = float("inf")
    out = torch.empty(b, h, g, n, dtype=torch.float32, device=query.device)
    _colsum_kernel[(b * hq, tiles)](query, keys, lse, out, *args, scale_log2,
                                    BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee)
    return out
