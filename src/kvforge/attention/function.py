"""The one attention function kvforge registers with transformers (`attn_implementation="kvforge"`).

It receives the final (post-norm, post-RoPE) queries of every model family, so nothing here is
per-model. For a layer of a `KVCache` it maps the logical mask onto the stored entries, runs the
backend, and hands the layer to the active press when the cache is armed.
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import causal_mask_function, sdpa_mask

from kvforge.attention.backends import BACKENDS, causal_mask
from kvforge.attention.context import LayerContext
from kvforge.attention.masks import entry_mask
from kvforge.cache.coded import CodedLayer
from kvforge.cache.kvcache import GRAPH_STEP, take_binding
from kvforge.cache.layers import DenseLayer, HeadVarlenLayer, PackedHeadLayer
from kvforge.errors import KVForgeError
from kvforge.kernels.decode import decode_attention, dense_decode_attention

NAME = "kvforge"
_local = threading.local()


def backend_name() -> str:
    """`sdpa` (default) or `eager` (the slow reference), from `KVFORGE_ATTENTION` or `use_backend()`."""
    return getattr(_local, "backend", None) or os.environ.get("KVFORGE_ATTENTION", "sdpa")


class use_backend:
    """Context manager: run attention through another backend in this thread (tests use `eager`)."""

    def __init__(self, name: str):
        if name not in BACKENDS:
            raise KVForgeError(f"unknown attention backend {name!r}; allowed: {', '.join(BACKENDS)}")
        self.name = name

    def __enter__(self):
        self.prev = getattr(_local, "backend", None)
        _local.backend = self.name

    def __exit__(self, *exc):
        _local.backend = self.prev


def kvforge_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: returns (`[B, q, Hq, Dv]`, None).

    `softcap` (Gemma 2) and `s_aux` (gpt-oss's sink logits): every call runs the eager backend with them (SDPA, the
    fused decode kernels and graph mode have neither; a graph-mode step refuses them)."""
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    plain = softcap is None and sinks is None
    if GRAPH_STEP.cache is not None:  # a graph-mode decode step (GraphDecoder): no host reads, no binding
        if not plain:
            raise KVForgeError("graph-mode decoding has no soft-capped or sink attention (Gemma 2, gpt-oss); decode "
                               "eagerly (cuda_graph=False)")
        return _graph_step_attention(GRAPH_STEP.cache, module.layer_idx, query, scaling), None
    run = BACKENDS[backend_name()] if plain else partial(BACKENDS["eager"], softcap=softcap, sinks=sinks)
    fast = plain and backend_name() == "sdpa"  # the kernels below compute plain softmax attention
    q = query.shape[2]
    bound = take_binding(key)
    layer = None
    if bound is not None:
        cache, layer_idx = bound
        layer = cache.layers[layer_idx]
    if not isinstance(layer, DenseLayer):  # no cache, another cache, or a stock sliding layer
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask == 0
        is_causal = mask is None and q > 1 and key.shape[2] == q
        if mask is None and q > 1 and key.shape[2] > q:
            mask = causal_mask(q, key.shape[2], key.device)
        out = run(query, key, value, mask, scale=scaling, is_causal=is_causal)
        return out.transpose(1, 2).contiguous(), None

    if isinstance(layer, CodedLayer):
        out = _coded_attention(layer, query, attention_mask, scaling, cache, layer_idx, module, run) if fast else None
        if out is not None:
            return out, None
        key, value = layer.full()  # decoded copy (transient), then the generic path below

    press, ctx, chosen = cache.press, None, None
    mask = None if isinstance(layer, PackedHeadLayer) else entry_mask(attention_mask, layer, q)
    if press is not None and not cache.armed and q == 1 and press.acts_while_decoding:
        # decode-time selection (Quest): attend a subset of the stored entries, evict nothing
        ctx = LayerContext(module, cache, layer_idx, query, attention_mask, scaling)
        chosen = press.select(ctx)  # bool [B, H_kv, n] or None
        if chosen is not None:
            chosen = chosen[:, :, None, :]
            mask = chosen if mask is None else mask & chosen
    if isinstance(layer, PackedHeadLayer):
        if q == 1 and attention_mask is None and chosen is None and fast:
            # packed per-head segments: the Triton kernel on CUDA, its torch twin elsewhere
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            out = decode_attention(query[:, :, 0], layer.k_flat, layer.v_flat, layer.offsets, layer.lengths, scale,
                                   max_len=layer.max_len, total=layer.total)[:, :, None]
        elif attention_mask is None and chosen is None and fast:
            out = segment_attention(layer, query, scaling)  # a prefill chunk over per-head segments, no mask
        else:
            key, value = layer.padded()
            mask = entry_mask(attention_mask, layer, q)
            mask = mask if chosen is None else mask & chosen
            out = run(query, key, value, mask, scale=scaling)
    else:
        out = run(query, key, value, mask, scale=scaling, is_causal=mask is None and q > 1)
    if cache.observer is not None:
        cache.observer(ctx or LayerContext(module, cache, layer_idx, query, attention_mask, scaling))
    if cache.recorded is not None and layer_idx not in cache.recorded:  # the context prefill only
        cache.recorded[layer_idx] = (module, query, attention_mask, scaling)
    if cache.armed:
        _compress(press, cache, LayerContext(module, cache, layer_idx, query, attention_mask, scaling))
        cache.mark_compressed(layer_idx)
    elif press is not None and press.acts_while_decoding:
        # decode-time presses (H2O, TOVA, Scissorhands, DecodingPress) see every later forward
        press.on_decode(ctx or LayerContext(module, cache, layer_idx, query, attention_mask, scaling))
    return out.transpose(1, 2).contiguous(), None


COMPRESS_RANGE = "kvforge.compress"  # the profiler range around a timed `compress`


def _compress(press, cache, ctx: LayerContext) -> None:
    """`press.compress(ctx)`; when the cache counts press time (`cache.press_seconds` not None, `kvforge bench`): on
    CUDA two events on the stream around the call (`cache.press_events`, nothing synchronised, so the prefill runs as
    it does untimed); on CPU, or with `cache.press_sync`, the host clock with the device synchronised before and
    after (every host instruction of the call exposed: an upper bound, what benchmarks/profile_press.py breaks down)."""
    if cache.press_seconds is None:
        press.compress(ctx)
        return
    cuda = ctx.query.is_cuda
    events = cuda and not cache.press_sync
    if events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    elif cuda:
        torch.cuda.synchronize(ctx.query.device)
    t0 = time.perf_counter()
    with torch.profiler.record_function(COMPRESS_RANGE):  # what benchmarks/profile_press.py reads
        press.compress(ctx)
    if events:
        end.record()
        cache.press_events.append((start, end))
        return
    if cuda:
        torch.cuda.synchronize(ctx.query.device)
    cache.press_seconds += time.perf_counter() - t0


def segment_attention(layer: PackedHeadLayer, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Attention of q new tokens (already appended: the last q entries of every segment) over a packed per-head
    layer with no padding, one SDPA call per (row, KV head) segment, bottom-right causal: what the padded block under
    its per-head mask gives (`entry_mask`), without building that `[B, H_kv, G·q, n]` mask (at a prefill chunk of 8k
    over a 128k context, tens of GB). query `[B, Hq, q, Dk]` → `[B, Hq, q, Dv]`."""
    b, hq, q, _ = query.shape
    g = hq // layer.heads
    out = query.new_empty(b, hq, q, layer.v_flat.shape[-1])
    for i, (start, n) in enumerate(torch.stack([layer.offsets, layer.lengths.long()], 1).tolist()):  # one host read
        row, head = divmod(i, layer.heads)
        heads = slice(head * g, (head + 1) * g)
        keys, values = layer.k_flat[start : start + n][None, None], layer.v_flat[start : start + n][None, None]
        out[row, heads] = BACKENDS["sdpa"](query[row : row + 1, heads], keys, values, None, scale=scaling,
                                           is_causal=True)[0]
    return out


def _graph_step_attention(cache, layer_idx: int, query, scaling) -> torch.Tensor:
    """One-token decode in graph mode (`kvforge.cache.graphs.GraphDecoder`): write position and lengths live on the
    device, shapes are static, so the step can be captured in a CUDA graph and traced by `torch.compile`.
    Returns `[B, 1, Hq, Dv]`."""
    layer = cache.layers[layer_idx]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q = query.shape[2]
    if q > 1:  # a captured forward of several tokens (GraphForward): plain layers, causal by device-side length
        if type(layer) is not DenseLayer:
            raise KVForgeError(f"a graph-mode forward of {q} tokens needs plain full-attention layers; layer "
                               f"{layer_idx} is {type(layer).__name__}")
        keys, values, mask = layer.graph_window(q)
        return BACKENDS["sdpa"](query, keys, values, mask, scale=scale).transpose(1, 2)
    if isinstance(layer, CodedLayer) and layer.fused():
        out = layer.fused_attention(query[:, :, 0], scale, tail_len=layer.graph["pos"])
    elif isinstance(layer, CodedLayer) or (isinstance(layer, HeadVarlenLayer) and layer.block()[2] is not None):
        # a decoded code + static tail, or the padded per-head layout: what a masking implementation does (SDPA
        # over the block, validity mask)
        keys, values, valid = layer.graph_block() if isinstance(layer, CodedLayer) else layer.block()
        out = BACKENDS["sdpa"](query, keys, values, valid[:, :, None, :], scale=scale)[:, :, 0]
    else:
        k_flat, v_flat, offsets, lengths, max_len, total = layer.graph_segments()
        if not isinstance(layer, PackedHeadLayer):  # equal segments (dense, ring): lengths from the shapes
            out = dense_decode_attention(query[:, :, 0], k_flat, v_flat, offsets, lengths, scale)
        else:
            out = decode_attention(query[:, :, 0], k_flat, v_flat, offsets, lengths, scale, max_len=max_len,
                                   total=total)
    return out[:, None]


def _coded_attention(layer, query, attention_mask, scaling, cache, layer_idx, module, run):
    """Decode over a coded layer straight from its codes (fused Triton kernel: the codes are dequantized in
    registers, no full-precision copy), when possible: one query token, no mask, no press acting while
    decoding. Returns `[B, q, Hq, Dv]` or None (the caller then decodes the layer and runs the generic path)."""
    q = query.shape[2]
    press = cache.press
    if q != 1 or not layer.fused() or cache.armed or backend_name() != "sdpa":
        return None
    if os.environ.get("KVFORGE_FUSED", "1") == "0":  # debugging: always decode the codes, then SDPA
        return None
    if attention_mask is not None:
        return None
    if press is not None and press.acts_while_decoding:
        return None
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = layer.fused_attention(query[:, :, 0], scale)
    if cache.observer is not None:
            cache.observer(LayerContext(module, cache, layer_idx, query, attention_mask, scaling))
    return out[:, None]


def register() -> None:
    """Register `kvforge` with transformers' attention and mask interfaces (idempotent).

    The mask function is transformers' own `sdpa_mask` (`kvforge_mask`): our layers report their logical size, so
    it builds the mask in logical slot space (padding, causality, sliding windows), which `entry_mask` then maps
    onto the stored entries of each layer.
    """
    AttentionInterface.register(NAME, kvforge_attention)
    AttentionMaskInterface.register(NAME, kvforge_mask)


def kvforge_mask(*args, **kwargs):
    """transformers' `sdpa_mask`, except that a plain causal mask with no padding is None for any query length
    (sdpa_mask skips it only when q == 1 or q == kv): the attention function then applies the bottom-right causal
    mask over the stored entries without building a `[B, 1, q, L]` tensor, which a prefill chunk after earlier ones
    would need."""
    mask_function = kwargs.get("mask_function", causal_mask_function)
    padding = kwargs.get("attention_mask")
    if (not args and mask_function is causal_mask_function and kwargs.get("local_size") is None
            and kwargs.get("allow_is_causal_skip", True) and not torch.compiler.is_compiling()
            and (padding is None or bool(padding.all()))):
        return None
    return sdpa_mask(*args, **kwargs)
