"""`kvforge bench`: prefill time, compression overhead, decode ms/token, peak memory, KV bytes, attention-only
time per layer and its bandwidth as a fraction of the device's copy bandwidth (measured at start).

Speed and memory do not depend on weight values, so `--random-weights --config llama3.1-8b` is honest for
them (accuracy needs real weights: `kvforge eval`). Same-run ratios are what to compare; absolute numbers
only with the device named (it is written into every row).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvforge.cache.coded import CodedLayer
from kvforge.cache.graphs import AUTOTUNE, GraphDecoder, release_workspaces, resolve_compile
from kvforge.cache.kvcache import KVCache, check_chunking
from kvforge.cache.layers import PackedHeadLayer
from kvforge.config import layer_types, text_config
from kvforge.errors import KVForgeError, check_count
from kvforge.generate import prefill
from kvforge.kernels.decode import decode_attention


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps: int = 20) -> float:
    """Median seconds of `fn` after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30) if torch.device(device).type == "cuda" else (1 << 26)
    x = torch.randn(n // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 2 / _time(lambda: y.copy_(x), device, reps=10)


def _attention_only(layer, query, scale, device) -> float:
    """Seconds for one decode-attention call over the layer's stored entries, as the engine runs it."""
    from kvforge.attention.backends import sdpa

    if isinstance(layer, CodedLayer):
        if layer.fused():  # the engine reads the codes directly
            q = query[:, :, 0]
            return _time(lambda: layer.fused_attention(q, scale), device)
        return _time(lambda: sdpa(query, *layer.full(), None, scale=scale), device)
    if isinstance(layer, PackedHeadLayer):
        q = query[:, :, 0]
        return _time(lambda: decode_attention(q, layer.k_flat, layer.v_flat, layer.offsets, layer.lengths, scale,
                                              max_len=layer.max_len, total=layer.total), device)
    keys, values = layer.keys, layer.values
    return _time(lambda: sdpa(query, keys, values, None, scale=scale), device)


# storage layouts of per-head budgets, by the layer class that holds them
LAYOUTS = {"PackedHeadLayer": "packed", "HeadVarlenLayer": "padded"}

# the columns of every row, whatever the cache kind (None where a kind has no such measure); extra keys follow
COLUMNS = ["press", "compression_ratio", "context", "batch", "prefill_chunk", "prefill_s", "compression_overhead_s",
           "press_ms", "press_share", "prefill_peak_gb",
           "decode_ms_per_token", "tokens_per_s", "floor_ms_per_token", "x_floor", "speedup_vs_none", "peak_gb",
           "decode_peak_gb", "memory_freed_of_kv_removed", "kv_gb", "kv_allocated_gb", "entries_layer",
           "attention_ms_per_layer", "attention_frac_copy_bw", "layer_kind", "first_step_s", "cuda_graph", "compiled",
           "point", "run_started", "model", "dtype", "device", "new_tokens", "error"]


def bench_row(model, ids: torch.Tensor, press, new_tokens: int, copy_bw: float, weights_bytes: int,
              cuda_graph: bool = True, packed: bool | None = None,
              variants: tuple | list = (False,), chunk_size: int | None = None) -> list[dict]:
    """Prefill and compress once, then time `new_tokens` decode steps per compile variant (`False`, `True` or
    an inductor mode) on that same cache, one after another; one row per variant.

    `chunk_size`: prefill in chunks of that many tokens, compressing as it goes. `press_ms`: milliseconds spent in
    the press's `compress` during the prefill (scores, top-k, gathers; on CUDA the stream's span of each call between
    two events, the prefill not synchronised: `KVCache.press_time`), `press_share` its share of `prefill_s`;
    `prefill_peak_gb` the prefill's peak (CUDA).

    Each variant decodes from where the previous one stopped (the context grows by `new_tokens` per variant,
    reserved up front), so N variants cost one prefill instead of N. A compiler failure of a compiled variant
    is recorded in its row, not raised."""
    device = ids.device
    cuda = device.type == "cuda"
    gc.collect()  # nothing of an earlier row may still hold memory when this row's peak is measured
    if cuda:
        release_workspaces()  # nor cuBLAS's workspaces of the streams earlier rows ran on
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = KVCache(model, press=press, reserve=new_tokens * len(variants) + 8, packed=packed, chunk_size=chunk_size)
    cache.press_seconds = 0.0
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, torch.ones_like(ids), cache)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    press_s = cache.press_time()
    cache.armed = False
    prefill_peak = torch.cuda.max_memory_allocated() if cuda else None
    tok = logits.argmax(-1, keepdim=True)
    pos = ids.shape[1]
    rows = []
    for comp in variants:
        if cuda:  # the decode phase's own peak: weights + the kept KV + a step's activations
            gc.collect()
            torch.cuda.reset_peak_memory_stats()
        base = {"press": "none" if press is None else press.name,
                "compression_ratio": 0.0 if press is None else press.compression_ratio,
                "context": ids.shape[1], "batch": ids.shape[0], "prefill_chunk": chunk_size,
                "prefill_s": round(prefill_s, 4), "press_ms": round(press_s * 1e3, 3),
                "press_share": round(press_s / prefill_s, 4),
                "prefill_peak_gb": None if prefill_peak is None else round(prefill_peak / 1e9, 2)}
        try:
            decode_s, first_s, tok, pos, graphed = _decode_steps(model, cache, tok, pos, new_tokens,
                                                                 cuda_graph and cuda, comp)
        except Exception as e:
            if not comp:
                raise
            torch.compiler.reset()
            rows.append({**base, "compiled": comp if isinstance(comp, str) else True, "layer_kind": None,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        rows.append({**base, **_row_measures(model, cache, ids, decode_s, copy_bw, weights_bytes, prefill_peak),
                     "first_step_s": round(first_s, 2), "cuda_graph": graphed and cuda,
                     "compiled": (comp if isinstance(comp, str) else bool(comp)) if graphed else False})
    return rows


def _warm_up_presses(model, factories: dict, ratios: list[float], chunks: list[int | None], batch: int,
                     vocab: int, tokens: int = 256) -> None:
    """Run every press once on a short context (each ratio and chunk size) before anything is timed: the first call
    of a sort, top-k or gather kernel in a process loads it (CUDA's lazy module loading), which would otherwise be
    counted in the `press_ms` of whichever row came first (measured: 169 ms for knorm at 32k as the first press row
    of a run, against 60 ms at 128k after it)."""
    ids = torch.randint(100, vocab - 1, (batch, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    for factory in factories.values():
        for r in [0.0] if factory.ratio_free else ratios:
            for chunk in chunks:
                try:  # a press that cannot run on so short a context fails in its own row, with its error
                    cache = KVCache(model, press=factory(r), reserve=8,
                                    chunk_size=None if chunk is None else min(chunk, tokens // 2))
                    with torch.inference_mode():
                        prefill(model, ids, torch.ones_like(ids), cache)
                except Exception:
                    pass
                cache = None


def _decode_steps(model, cache: KVCache, tok: torch.Tensor, pos: int, new_tokens: int, cuda_graph: bool,
                  compile: bool | str) -> tuple[float, float, torch.Tensor, int, bool]:
    """Greedy-decode `new_tokens` steps: (median seconds per step, seconds of the first step including building
    the graph step — compilation, capture —, last token, next position, whether a GraphDecoder ran). On CPU a
    compiled step runs in graph mode, uncaptured."""
    device = tok.device
    decoder = None
    t0 = time.perf_counter()
    if cuda_graph or compile:
        try:
            decoder = GraphDecoder(model, cache, pos, new_tokens, tok.shape[0], compile=compile)
        except KVForgeError as e:  # e.g. sliding-window layers or decode-time presses: eager decoding
            print(f"no CUDA graph: {e}")
    build_s = time.perf_counter() - t0
    step_times = []
    try:
        with torch.inference_mode():
            for _ in range(new_tokens):
                _sync(device)
                t = time.perf_counter()
                if decoder is not None:
                    logits = decoder.step(tok)
                else:
                    logits = model(input_ids=tok, position_ids=torch.full_like(tok, pos), past_key_values=cache,
                                   logits_to_keep=1).logits[:, -1]
                tok = logits.argmax(-1, keepdim=True)
                _sync(device)
                step_times.append(time.perf_counter() - t)
                pos += 1
    finally:
        if decoder is not None:
            decoder.close()
    decode_s = statistics.median(step_times[2:] if len(step_times) > 4 else step_times)
    return decode_s, build_s + step_times[0], tok, pos, decoder is not None


def _row_measures(model, cache: KVCache, ids: torch.Tensor, decode_s: float, copy_bw: float, weights_bytes: int,
                  prefill_peak: int | None) -> dict:
    """The row's numbers after a decode: speed against the bytes floor, memory, attention-only time."""
    device = ids.device
    cuda = device.type == "cuda"
    stats = cache.stats()
    first = cache.compressible_layers()[0]
    layer = cache.layers[first]
    cfg = model.config.get_text_config()
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    query = torch.randn(ids.shape[0], cfg.num_attention_heads, 1, hd, dtype=model.dtype, device=device)
    att_s = _attention_only(layer, query, hd**-0.5, device)
    layer_bytes = layer.stored_bytes()  # what one decode step must read from this layer
    floor_s = (weights_bytes + stats["bytes"]) / copy_bw
    return {
        "decode_ms_per_token": round(decode_s * 1e3, 3),
        "tokens_per_s": round(ids.shape[0] / decode_s, 2),
        "floor_ms_per_token": round(floor_s * 1e3, 3),
        "x_floor": round(decode_s / floor_s, 2),
        "peak_gb": round(max(prefill_peak, torch.cuda.max_memory_allocated()) / 1e9, 2) if cuda else None,
        "decode_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "kv_gb": round(stats["bytes"] / 1e9, 3),
        "kv_allocated_gb": round(stats["allocated_bytes"] / 1e9, 3),
        "entries_layer": mean_entries(layer),
        "attention_ms_per_layer": round(att_s * 1e3, 4),
        "attention_frac_copy_bw": round(layer_bytes / att_s / copy_bw, 3),
        "layer_kind": type(layer).__name__,
    }


def mean_entries(layer) -> float:
    """Entries a layer holds per (batch row, KV head), averaged: the same quantity for dense, per-head (padded or
    packed), coded and transformers' own layers."""
    valid = layer.entry_valid() if callable(getattr(layer, "entry_valid", None)) else None
    if valid is not None:
        return round(float(valid.sum()) / (valid.shape[0] * valid.shape[1]), 2)
    counts = layer.entry_counts() if callable(getattr(layer, "entry_counts", None)) else layer.get_seq_length()
    return float(counts if isinstance(counts, int) else sum(counts) / len(counts))


HF_CACHE_OPTIONS = ("bits", "group_size", "residual_length")


def parse_hf_cache(spec: str) -> tuple[str, dict]:
    """`dynamic`, `quanto@bits=2[@group_size=N][@residual_length=N]` or `hqq@...` -> (name, options); anything
    else is a one-line KVForgeError."""
    allowed = "dynamic, quanto@bits=N, hqq@bits=N (options bits, group_size, residual_length)"
    name, *opts = spec.split("@")
    if name not in ("dynamic", "quanto", "hqq"):
        raise KVForgeError(f"unknown transformers cache {spec!r}; allowed: {allowed}")
    kw = {}
    for o in opts:
        key, _, value = o.partition("=")
        if name == "dynamic" or key not in HF_CACHE_OPTIONS or key in kw or not value.isdigit() or int(value) < 1:
            raise KVForgeError(f"transformers cache {spec!r}: bad option {o!r}; allowed: {allowed}")
        kw[key] = int(value)
    return name, kw


def hf_cache(spec: str, model):
    """A transformers cache from a spec: `dynamic` (bf16 DynamicCache) or `quanto@bits=2|4[@group_size=..]
    [@residual_length=..]` / `hqq@...` (transformers' QuantizedCache, which needs optimum-quanto / hqq)."""
    from transformers import DynamicCache, QuantizedCache

    name, kw = parse_hf_cache(spec)
    if name == "dynamic":
        return DynamicCache(config=model.config)
    return QuantizedCache(backend=name, config=model.config, nbits=kw.get("bits", 4),
                          q_group_size=kw.get("group_size", 64), residual_length=kw.get("residual_length", 128))


def _hf_measures(model, cache, ids: torch.Tensor, decode_s: float, copy_bw: float | None,
                 weights_bytes: int | None) -> dict:
    """The columns of `_row_measures` for a transformers cache: bytes and entries of its plain layers (a quantized
    layer's packed bytes are the backend's own: not measured), attention-only time on the first full-attention
    layer."""
    from transformers.cache_utils import BaseQuantizedLayer

    device = ids.device
    types = layer_types(model)
    first = types.index("full_attention") if "full_attention" in types else 0
    layer = cache.layers[first]
    plain = not any(isinstance(lay, BaseQuantizedLayer) for lay in cache.layers)
    kv = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values)
             if isinstance(t, torch.Tensor)) if plain else None
    att_s = floor_s = None
    if plain:
        cfg = text_config(model)
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        query = torch.randn(ids.shape[0], cfg.num_attention_heads, 1, hd, dtype=model.dtype, device=device)
        att_s = _attention_only(layer, query, hd**-0.5, device)
        if copy_bw and weights_bytes is not None:
            floor_s = (weights_bytes + kv) / copy_bw
    layer_bytes = None if not plain else sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return {
        "floor_ms_per_token": None if floor_s is None else round(floor_s * 1e3, 3),
        "x_floor": None if floor_s is None else round(decode_s / floor_s, 2),
        "kv_gb": None if kv is None else round(kv / 1e9, 3),
        "kv_allocated_gb": None if kv is None else round(kv / 1e9, 3),
        "entries_layer": float(cache.get_seq_length(first)),
        "attention_ms_per_layer": None if att_s is None else round(att_s * 1e3, 4),
        "attention_frac_copy_bw": None if att_s is None or not copy_bw else round(layer_bytes / att_s / copy_bw, 3),
    }


def hf_row(model, ids: torch.Tensor, spec: str, new_tokens: int, copy_bw: float | None = None,
           weights_bytes: int | None = None) -> dict:
    """Plain transformers decoding (SDPA attention, the given cache, eager steps): the reference row, with the
    same columns as a kvforge row (`COLUMNS`)."""
    device = ids.device
    cuda = device.type == "cuda"
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        if cuda:
            release_workspaces()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cache = hf_cache(spec, model)
        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            _sync(device)
            prefill_s = time.perf_counter() - t0
            prefill_peak = torch.cuda.max_memory_allocated() if cuda else None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            tok, pos, times = out.logits[:, -1].argmax(-1, keepdim=True), ids.shape[1], []
            for _ in range(new_tokens):
                _sync(device)
                t = time.perf_counter()
                logits = model(input_ids=tok, position_ids=torch.full_like(tok, pos), past_key_values=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1]
                tok = logits.argmax(-1, keepdim=True)
                _sync(device)
                times.append(time.perf_counter() - t)
                pos += 1
        decode_s = statistics.median(times[2:] if len(times) > 4 else times)
        decode_peak = torch.cuda.max_memory_allocated() if cuda else None
        measures = _hf_measures(model, cache, ids, decode_s, copy_bw, weights_bytes)
    finally:
        model.set_attn_implementation(impl)
    return {"press": f"transformers:{spec}", "compression_ratio": 0.0, "context": ids.shape[1],
            "batch": ids.shape[0], "prefill_s": round(prefill_s, 4), "decode_ms_per_token": round(decode_s * 1e3, 3),
            "tokens_per_s": round(ids.shape[0] / decode_s, 2),
            "peak_gb": round(max(prefill_peak, decode_peak) / 1e9, 2) if cuda else None,
            "decode_peak_gb": round(decode_peak / 1e9, 2) if cuda else None, **measures,
            "layer_kind": type(cache).__name__, "first_step_s": round(times[0], 2) if times else None,
            "cuda_graph": False, "compiled": False}


def _press_rows(model, ids, spec: str, factory, ratio: float, variants: list, new_tokens: int,
                copy_bw: float, weights_bytes: int, cuda_graph: bool, layouts: list[str] | None,
                chunk_size: int | None = None) -> list[dict]:
    """One grid point: one prefill on the device's own storage timed for every compile variant, then,
    for per-head budgets, the same press on the other requested layouts."""
    press = None if spec == "none" else factory(ratio)
    rows = bench_row(model, ids, press, new_tokens, copy_bw, weights_bytes, cuda_graph, variants=variants,
                     chunk_size=chunk_size)
    own = next((LAYOUTS.get(r["layer_kind"]) for r in rows if r.get("layer_kind")), None)
    out = [{**row, "press": f"{spec} [{own}]" if own and layouts else spec} for row in rows]
    if own and layouts:  # per-head budgets: the other requested layouts too, labelled
        for lay in layouts:
            if lay != own:
                other = bench_row(model, ids, factory(ratio), new_tokens, copy_bw, weights_bytes, cuda_graph,
                                  packed=lay == "packed", variants=variants, chunk_size=chunk_size)
                out += [{**o, "press": f"{spec} [{lay}]"} for o in other]
    return out


def _resumable(path: Path, setup: dict) -> tuple[dict[str, list[dict]], list[dict]]:
    """Rows of an earlier run in `path` with the same set-up, by grid point (points with an error row are left
    out: they run again), and that file's runs; nothing when the file is missing or holds no rows. Rows of another
    set-up are refused with a one-line KVForgeError naming the setting (pass `overwrite` to start clean)."""
    from kvforge.eval.runs import refuse_other_settings

    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, []
    meta = old.get("meta", {})
    if not old.get("rows"):
        return {}, []
    refuse_other_settings(path.parent, {k: meta[k] for k in setup if k in meta}, setup, what="bench run")
    by_point: dict[str, list[dict]] = {}
    for row in old.get("rows", []):
        if "point" in row:
            by_point.setdefault(row["point"], []).append(row)
    kept = {p: rs for p, rs in by_point.items() if not any(r.get("error") for r in rs)}
    return kept, meta.get("runs", [])


def kv_bytes(model_or_config, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of an uncompressed cache of `tokens` entries per row (a sliding-window layer holds at most its window)."""
    cfg = text_config(model_or_config)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None) or tokens
    entries = sum(min(tokens, window) if t == "sliding_attention" else tokens for t in layer_types(cfg))
    return 2 * entries * heads * hd * batch * dtype.itemsize


def _check_fits(model_or_config, contexts: list[int], reserve: int, what: str) -> None:
    """Every context plus the decoded tokens must fit the model's positions."""
    limit = int(getattr(text_config(model_or_config), "max_position_embeddings", 0) or 0)
    longest = max(contexts)
    if limit and longest + reserve > limit:
        raise KVForgeError(f"--context {longest} + {reserve} decoded tokens exceeds the {limit} positions of {what}; "
                           f"use contexts of at most {limit - reserve}")


def _check_bench_args(contexts, batch, presses, ratios, new_tokens, compile, layouts, hf_caches,
                      prefill_chunks=(None,)) -> tuple:
    """Every argument, before the model loads or anything is written: (press factories, compile variants)."""
    from kvforge.presses.registry import parse_press

    if not contexts:
        raise KVForgeError("the context list is empty; give at least one context length (e.g. 4k)")
    for n in contexts:
        check_count(n, "context")
    check_count(batch, "batch")
    check_count(new_tokens, "new_tokens")
    if not presses:
        raise KVForgeError("the press list is empty; give at least one press, or none (see `kvforge presses`)")
    if not ratios:
        raise KVForgeError("the ratio list is empty; give at least one compression ratio in [0, 1)")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise KVForgeError(f"ratio {r} is outside the allowed range [0, 1)")
    if not prefill_chunks:
        raise KVForgeError("the prefill chunk list is empty; give chunk sizes, or none for an unchunked prefill")
    for chunk in prefill_chunks:
        check_chunking(None, chunk)
    factories = {spec: parse_press(spec) for spec in presses if spec != "none"}
    for factory in factories.values():  # every (press, ratio) builds now: a bad one fails before any timing
        for r in [0.0] if factory.ratio_free else ratios:
            for chunk in prefill_chunks:
                check_chunking(factory(r), chunk)
    modes = {False: [False], "off": [False], True: [True], "on": [True], "both": [False, True],
             "autotune": [True, AUTOTUNE], "max-autotune": [AUTOTUNE], "auto": ["auto"]}.get(compile)
    if modes is None:
        raise KVForgeError(f"unknown compile mode {compile!r}; allowed: auto, off, on, both, autotune, max-autotune")
    bad = set(layouts or []) - set(LAYOUTS.values())
    if bad:
        raise KVForgeError(f"unknown layout(s) {sorted(bad)}; allowed: {', '.join(LAYOUTS.values())}")
    for spec in hf_caches or []:
        parse_hf_cache(spec)
    return factories, modes


def run_bench(model_name: str | None, config: str | None, contexts: list[int], batch: int, presses: list[str],
              ratios: list[float], new_tokens: int, out: str, device: str | None = None,
              cuda_graph: bool = True, hf_caches: list[str] | None = None, layouts: list[str] | None = None,
              model=None, compile: bool | str = "auto", overwrite: bool = False,
              prefill_chunks: list[int | None] | None = None, sharing: list[str] | None = None,
              sharing_warmup: int = 2) -> list[dict]:
    """Time every (context, press, ratio) and write bench.json / bench.csv / bench.png under `out`.

    `sharing` (Llama-architecture models): cross-layer KV sharing presets (`kvforge.sharing`:
    lckv, cla, yoco, mixattention; lckv with `sharing_warmup` warm-up layers) timed at every context next to the
    dense model, same shapes and run, with random weights (speed and memory do not depend on them). Those models
    decode eagerly (no CUDA graph for them), so each context also gets a `none [eager]` row of the dense model and
    the sharing rows' `speedup_vs_dense` compares with it.

    `prefill_chunks`: prefill chunk sizes to time every point with (None = unchunked; default `[None]`); each row
    names its `prefill_chunk`, and `compression_overhead_s` / the ratios against `none` compare rows of the same
    chunk size.

    `layouts` ("packed", "padded"): per-head-budget presses are timed on each of these storage layouts (packed
    head-varlen vs a padded block with a validity mask, what a masking implementation does); by default only on
    the device's own (packed on CUDA, padded on CPU). `model`: an already loaded model (tests). `compile`:
    `torch.compile` the captured decode step (`GraphDecoder(compile=True)`): "auto" (the default: max-autotune on
    CUDA, nothing elsewhere, `kvforge.cache.graphs.resolve_compile`), True / "on", "both" (every row
    twice, without and with, in the same run), "autotune" (default and inductor's max-autotune GEMMs) or
    "max-autotune" (only the latter). The compile variants of one row share one prefill: each decodes
    `new_tokens` more on the same compressed cache. An interrupted run resumes: rows already in `out`/bench.json
    from the same set-up (model, device, batch, new tokens, compile modes, layouts) are kept, not re-timed; each
    row names the run (`run_started`, to the microsecond: it tells runs apart) that timed it, and `meta.runs` lists
    every run's copy bandwidth. Rows of another set-up in `out` are refused (one line naming the setting) unless
    `overwrite=True`, which starts clean. Every argument, the model's positions and (for random weights, before
    they are built) the memory needed are checked first: a refused run writes nothing."""
    from kvforge.eval.runs import (
        check_out,
        device_name,
        git_commit,
        prepare_out,
        write_csv_atomic,
        write_text_atomic,
    )
    from kvforge.models import (
        check_memory,
        load_model,
        random_config,
        random_weights_bytes,
        resolve_device,
        resolve_dtype,
    )

    prefill_chunks = [None] if prefill_chunks is None else list(prefill_chunks)
    sharing_maps = _sharing_maps(sharing or [], config, model, sharing_warmup)
    factories, modes = _check_bench_args(contexts, batch, presses, ratios, new_tokens, compile, layouts, hf_caches,
                                         prefill_chunks)
    reserve = new_tokens * len(modes) + 8  # decoded after each context (every compile variant decodes on)
    out_dir = check_out(out)
    if model is None:
        if config:  # positions and memory before building anything
            dev_name = resolve_device(device or "auto")
            dtype = resolve_dtype(None, dev_name)
            need = random_weights_bytes(config, dtype, dev_name) + kv_bytes(random_config(config), batch,
                                                                            max(contexts) + reserve, dtype)
            check_memory(need, dev_name, f"bench of random-weight {config!r} ({str(dtype).replace('torch.', '')} "
                         f"weights + the KV cache of {batch} x {max(contexts)} tokens)",
                         "use shorter --context, a smaller --batch or --config, or a device with more memory")
        model, _ = load_model(config or model_name, random_weights=bool(config), device=device or "auto")
    dev = next(model.parameters()).device
    modes = [resolve_compile(m, dev) if m == "auto" else m for m in modes]  # what "auto" is on this device
    if not config:  # random weights have no trained positions: their RoPE formula holds past the config's limit
        _check_fits(model, contexts, reserve, "the model")
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not config:  # the weights are in place: the largest cache must fit beside them
        check_memory(kv_bytes(model, batch, max(contexts) + reserve, model.dtype), dev,
                     f"the KV cache of {batch} x {max(contexts)} tokens", "use shorter --context or a smaller --batch")
    setup = {"model": config or model_name, "random_weights": bool(config), "device": device_name(model),
             "dtype": str(model.dtype).replace("torch.", ""), "batch": batch, "new_tokens": new_tokens,
             "compile": modes, "cuda_graph": cuda_graph, "layouts": layouts}
    if sharing_maps:
        setup["sharing_warmup"] = sharing_warmup
    saved, runs = ({}, []) if overwrite else _resumable(out_dir / "bench.json", setup)
    out_dir = prepare_out(out_dir)  # every check passed: the first write
    if overwrite:
        for name in ("bench.json", "bench.csv", "bench.png"):
            (out_dir / name).unlink(missing_ok=True)
    copy_bw = copy_bandwidth(dev)
    vocab = model.config.get_text_config().vocab_size
    started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    this_run = {"started": started, "copy_TBps": round(copy_bw / 1e12, 3), "git_commit": git_commit()}
    meta = {**setup, **this_run, "weights_gb": round(weights_bytes / 1e9, 2)}
    meta["runs"] = runs + [this_run]
    if saved:
        print(f"resuming: {sum(len(v) for v in saved.values())} finished rows of an earlier run kept")
    print(f"{meta['device']}: copy bandwidth {meta['copy_TBps']} TB/s, weights {meta['weights_gb']} GB")
    rows = []

    def emit(point: str, new: list[dict]) -> None:  # a finished point reaches the disk at once
        for row in new:
            row.setdefault("point", point)
            row.setdefault("run_started", started)
            for key in ("model", "dtype", "device", "new_tokens"):  # the settings that define the row, with it
                row.setdefault(key, setup[key])
            for key in COLUMNS:  # every cache kind reports the same columns (None: not measured for this kind)
                row.setdefault(key, None)
            rows.append(row)
            tqdm.write(json.dumps(row))
        write_text_atomic(out_dir / "bench.json", json.dumps({"meta": meta, "rows": rows}, indent=2))

    _warm_up_presses(model, factories, ratios, prefill_chunks, batch, vocab)
    grids = {n: [(chunk, spec, r) for chunk in prefill_chunks for spec in presses
                 for r in ([0.0] if spec == "none" or factories[spec].ratio_free else ratios)] for n in contexts}
    bar = tqdm(total=sum(len(g) + len(hf_caches or []) + (len(sharing_maps) + 1 if sharing_maps else 0)
                         for g in grids.values()), desc="bench", unit="row", dynamic_ncols=True)
    for n in contexts:
        ids = torch.randint(100, vocab - 1, (batch, n), generator=torch.Generator().manual_seed(n)).to(dev)
        base_prefill: dict = {}  # chunk size -> the none row's prefill seconds
        for chunk, spec, r in grids[n]:
            point = f"{n}/{spec}/{r}" + ("" if chunk is None else f"/chunk={chunk}")
            bar.set_postfix_str(point)
            todo = saved.get(point) or _press_rows(model, ids, spec, factories.get(spec), r, modes, new_tokens,
                                                   copy_bw, weights_bytes, cuda_graph, layouts, chunk)
            if spec == "none" and chunk not in base_prefill:
                base_prefill[chunk] = todo[0].get("prefill_s")
            base = base_prefill.get(chunk)
            if point not in saved:
                for row in todo:
                    row["compression_overhead_s"] = (None if base is None or row.get("prefill_s") is None else
                                                     round(row["prefill_s"] - base, 4))
            emit(point, todo)
            bar.update()
        for spec in hf_caches or []:
            point = f"{n}/transformers:{spec}"
            try:
                todo = saved.get(point) or [hf_row(model, ids, spec, new_tokens, copy_bw, weights_bytes)]
            except Exception as e:  # a missing optional backend (optimum-quanto, hqq) must not lose the run
                todo = [{"press": f"transformers:{spec}", "compression_ratio": 0.0, "context": n, "batch": batch,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"}]
            emit(point, todo)
            bar.update()
    if sharing_maps:
        if not all(sharing_maps.values()):  # a model loaded by name: check and build the maps now
            sharing_maps = _sharing_maps(list(sharing_maps), None, model, sharing_warmup)
        _sharing_rows(model, sharing_maps, contexts, batch, new_tokens, copy_bw, saved, emit, bar)
    bar.close()
    against_none(rows)
    _against_dense(rows)
    write_text_atomic(out_dir / "bench.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    for r in rows:
        if r.get("speedup_vs_none") is not None and r["press"] != "none":
            freed = r.get("memory_freed_of_kv_removed")
            print(f"{r['press']} {r['compression_ratio']} at {r['context']}: {r['speedup_vs_none']}x the decode speed "
                  f"of none" + ("" if freed is None else f", decode peak memory freed {freed:.0%} of the KV bytes "
                                "removed"))
    fields = list(dict.fromkeys(COLUMNS + [k for r in rows for k in r]))  # the same columns for every cache kind
    write_csv_atomic(out_dir / "bench.csv", rows, fields)
    _plot(rows, out_dir / "bench.png")
    return rows


def _sharing_maps(names: list[str], config: str | None, model, warmup: int) -> dict[str, str]:
    """Preset name -> layer-map string for `--sharing`, checked before any work (one-line errors)."""
    if not names:
        return {}
    from kvforge.models import random_config
    from kvforge.sharing import preset_maps

    if model is None and not config:  # a model by name: its config is read when it loads; checked then
        return dict.fromkeys(names, "")
    return preset_maps(names, model.config if model is not None else random_config(config), warmup)


def _sharing_rows(dense, maps: dict[str, str], contexts: list[int], batch: int, new_tokens: int, copy_bw: float,
                  saved: dict, emit, bar) -> None:
    """A `none [eager]` row of the dense model and one row per sharing preset at every context (eager decoding,
    no press), each sharing model built with the dense model's config and random weights, one at a time."""
    import gc

    from kvforge.sharing import random_sharing_model

    dev, vocab = dense.device, dense.config.vocab_size
    models = [("none [eager]", None)] + list(maps.items())
    for name, layer_map in models:
        points = [f"{n}/sharing:{name}" for n in contexts]
        if all(p in saved for p in points):
            for p in points:
                emit(p, saved[p])
                bar.update()
            continue
        model = dense if layer_map is None else random_sharing_model(dense, layer_map)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for n, point in zip(contexts, points):
            ids = torch.randint(100, vocab - 1, (batch, n), generator=torch.Generator().manual_seed(n)).to(dev)
            todo = saved.get(point) or bench_row(model, ids, None, new_tokens, copy_bw, weights, cuda_graph=False)
            label = "none [eager]" if layer_map is None else f"sharing:{name}"
            emit(point, [{**r, "press": label, "kv_layers": layer_map or "dense"} for r in todo])
            bar.update()
        if layer_map is not None:
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _against_dense(rows: list[dict]) -> None:
    """Sharing rows: `speedup_vs_dense` against the dense model's eager row of the same context and run (their
    `speedup_vs_none` would compare an eager decode with a captured one, so it is left empty)."""
    base = {(r["context"], r["run_started"]): r for r in rows if r.get("press") == "none [eager]"}
    for r in rows:
        if not str(r.get("press", "")).startswith("sharing:"):
            continue
        r["speedup_vs_none"] = r["memory_freed_of_kv_removed"] = None
        ref = base.get((r.get("context"), r.get("run_started")))
        if ref and ref.get("decode_ms_per_token") and r.get("decode_ms_per_token"):
            r["speedup_vs_dense"] = round(ref["decode_ms_per_token"] / r["decode_ms_per_token"], 3)


def against_none(rows: list[dict]) -> None:
    """Add to each row, against the `none` row of the same context, batch and compile variant timed in the same run
    (a resumed run's rows are not compared with an earlier run's):
    `speedup_vs_none` (none's decode time / the row's) and, where peaks were measured (CUDA),
    `memory_freed_of_kv_removed` ((none's decode peak − the row's) / (none's KV bytes − the row's)): 1.0 means
    every byte the press removed from the cache left the GPU's peak."""
    def key(r: dict) -> tuple:
        return r.get("context"), r.get("batch"), r.get("compiled", False), r.get("run_started"), r.get("prefill_chunk")

    base = {key(r): r for r in rows if r.get("press") == "none" and r.get("decode_ms_per_token") is not None}
    for r in rows:
        ref = base.get(key(r))
        if ref is None or r.get("decode_ms_per_token") is None:
            continue
        r["speedup_vs_none"] = round(ref["decode_ms_per_token"] / r["decode_ms_per_token"], 3)
        if ref.get("kv_gb") is None or r.get("kv_gb") is None:  # e.g. a transformers quantized cache
            continue
        removed = ref["kv_gb"] - r["kv_gb"]
        if r.get("decode_peak_gb") is not None and ref.get("decode_peak_gb") is not None and removed > 0:
            r["memory_freed_of_kv_removed"] = round((ref["decode_peak_gb"] - r["decode_peak_gb"]) / removed, 3)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("decode_ms_per_token") is not None and not r["press"].startswith("transformers:")]
    mem = "peak_gb" if any(r.get("peak_gb") is not None for r in rows) else "kv_gb"  # CPU: no peak counter
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    variants = sorted({str(r.get("compiled", False)) for r in rows})  # one line per compile variant
    chunks = sorted({str(r.get("prefill_chunk")) for r in rows})  # and per prefill chunk size
    lines = [(n, p, v, c) for n in sorted({r["context"] for r in rows})
             for p in sorted({r["press"] for r in rows if r["press"] != "none"}) for v in variants for c in chunks]
    for n, press, v, c in lines:
        pts = sorted(((r["compression_ratio"], r) for r in rows if r["context"] == n and r["press"] in (press, "none")
                      and str(r.get("compiled", False)) == v and str(r.get("prefill_chunk")) == c),
                     key=lambda p: p[0])
        xs = [x for x, _ in pts]
        label = (f"{press} {n}" + (f" compiled={v}" if len(variants) > 1 else "")
                 + (f" chunk={c}" if len(chunks) > 1 else ""))
        axes[0].plot(xs, [r["decode_ms_per_token"] for _, r in pts], marker="o", label=label)
        axes[1].plot(xs, [r[mem] for _, r in pts], marker="o", label=label)
    axes[0].set_ylabel("decode ms / token")
    axes[1].set_ylabel("peak GPU memory (GB)" if mem == "peak_gb" else "KV cache (GB)")
    for ax in axes:
        ax.set_xlabel("compression ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
