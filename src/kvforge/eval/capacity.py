"""`kvforge bench --max-context / --max-batch`: the longest context (or the largest batch) that fits in memory, per
press, ratio and prefill chunk size, found by search next to `none` in the same run.

A size fits when a prefill of it (chunked and compressed as asked) and a few decode steps run without running out of
memory — `torch.OutOfMemoryError` on CUDA, memory freed between tries — and, with `memory_limit`, when their peak
stays under it (on CPU, where nothing runs out first, this is how the search is exercised: the peak counts the weights
plus what the prefill allocated, measured from torch's profiler). On CUDA the limit is also the allocator's own cap
(`torch.cuda.set_per_process_memory_fraction`) for the search: a try that would pass it runs out of memory as soon as
it allocates past it, as on a GPU of that size, instead of running to its end first. The search
grows the size exponentially until a try fails, then halves the gap (`largest_fitting`; `largest_fitting_linear` is
its slow twin). It assumes that what fits at n fits below n, which holds for memory.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from kvforge.cache.kvcache import KVCache, check_chunking
from kvforge.errors import KVForgeError, check_count
from kvforge.generate import model_max_length, prefill


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, step: int = 1) -> int:
    """The largest multiple of `step` in `[step, limit]` for which `fits`, or 0 when none does. Tries `start`
    (rounded down to a multiple of `step`, at least `step`), doubles while it fits, then binary-searches the gap
    between the last size that fit and the first that failed (or `limit`): about 2·log2(limit / step) tries."""
    lo, hi = 0, limit // step + 1  # in units of `step`: lo fits (0 trivially), hi fails or lies beyond the limit
    unit = max(1, start // step)
    while unit < hi:
        if not fits(unit * step):
            hi = unit
            break
        lo, unit = unit, unit * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid
    return lo * step


def largest_fitting_linear(fits: Callable[[int], bool], limit: int, step: int = 1) -> int:
    """Slow twin of `largest_fitting`: try `step, 2·step, …` up to `limit` and stop at the first failure."""
    best = 0
    for n in range(step, limit + 1, step):
        if not fits(n):
            break
        best = n
    return best


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """The most bytes allocated at once while `fn()` ran, above what was allocated when it started. CUDA: the
    allocator's peak counter; CPU: torch.profiler's allocation and free events, summed in time order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    now = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def run_once(model, press, batch: int, context: int, chunk_size: int | None, new_tokens: int = 2) -> None:
    """Prefill `batch` rows of `context` random tokens (chunked and compressed as asked), then `new_tokens` greedy
    decode steps; everything it allocated is dropped on return."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab - 1, (batch, context), generator=torch.Generator().manual_seed(context)).to(device)
    cache = KVCache(model, press=press, reserve=new_tokens + 8, chunk_size=chunk_size)
    logits = prefill(model, ids, torch.ones_like(ids), cache)
    cache.armed = False
    tok = logits.argmax(-1, keepdim=True)
    with torch.inference_mode():
        for i in range(new_tokens):
            pos = torch.full_like(tok, context + i)
            logits = model(input_ids=tok, position_ids=pos, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)


def fits(model, press, batch: int, context: int, chunk_size: int | None, memory_limit: int | None = None,
         new_tokens: int = 2) -> tuple[bool, int | None]:
    """(whether `run_once` fits, its peak in bytes: the device's allocated bytes at the peak on CUDA, the weights
    plus the run's own peak on CPU; None when it ran out of memory). Running out of memory is a failed try, with
    everything freed before the next one; exceeding `memory_limit` (bytes) counts as running out."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)  # the weights and whatever else is held
    else:
        base = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = None
    try:
        peak = base + peak_bytes(lambda: run_once(model, press, batch, context, chunk_size, new_tokens), device)
    except torch.OutOfMemoryError:
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ok = peak is not None and (memory_limit is None or peak <= memory_limit)
    return ok, peak


@contextmanager
def memory_cap(device: torch.device, limit_bytes: int | None):
    """On CUDA, cap the caching allocator at `limit_bytes` (everything allocated counts, the weights included) for
    the duration, then lift the cap; elsewhere (or with no limit) do nothing."""
    if device.type != "cuda" or limit_bytes is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _done_rows(path, keys: list[str]) -> dict[tuple, dict]:
    """Rows of an earlier, interrupted run (`capacity.jsonl`), by their search settings; a cut last line is
    dropped."""
    from kvforge.eval.runs import drop_partial_line

    if not path.exists():
        return {}
    drop_partial_line(path)
    done = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            done[tuple(row[k] for k in keys)] = row
        except (ValueError, KeyError, TypeError):
            raise KVForgeError(f"{path}: line {n} is not a capacity row; move the file away to start over") from None
    return done


def run_capacity(model, presses: list[str], ratios: list[float], out: str, what: str = "context",
                 prefill_chunks: list[int | None] | None = None, batch: int = 1, contexts: list[int] | None = None,
                 memory_limit_gb: float | None = None, step: int = 1024, start: int | None = None,
                 new_tokens: int = 2, limit: int | None = None, sharing: list[str] | None = None,
                 sharing_warmup: int = 2) -> list[dict]:
    """For every (prefill chunk, press, ratio) — `none` included — the longest context (`what="context"`, at
    `batch`) or the largest batch (`what="batch"`, at each of `contexts`) that fits; rows written to
    `out`/capacity.json and capacity.csv (each row also appended to capacity.jsonl as it is found: a re-run with
    the same settings skips the rows already there, so an interrupted search resumes). `step`: the context
    granularity (batches are searched to 1); `limit`: the largest size tried (default: the model's positions minus
    the decoded tokens for contexts, 4096 for batches).
    `sharing`: cross-layer sharing presets (Llama architecture), each searched unpressed and unchunked with a
    random-weight sharing model of the same shapes, rows `sharing:<preset>` (with `kv_layers`)."""
    from kvforge.eval.runs import device_name, prepare_out, write_csv_atomic, write_text_atomic
    from kvforge.presses.registry import parse_press

    if what not in ("context", "batch"):
        raise KVForgeError(f"unknown capacity search {what!r}; allowed: context, batch")
    check_count(batch, "batch")
    check_count(step, "step")
    chunks = [None] if prefill_chunks is None else list(prefill_chunks)
    if not presses or not ratios or not chunks:
        raise KVForgeError("give at least one press, one ratio and one prefill chunk size (none = unchunked)")
    if memory_limit_gb is not None and (isinstance(memory_limit_gb, bool) or not memory_limit_gb > 0):
        raise KVForgeError(f"memory_limit_gb={memory_limit_gb!r}; allowed: a number of GB > 0")
    if what == "batch" and not contexts:
        raise KVForgeError("a batch search needs the context length(s) to search at")
    factories = {spec: parse_press(spec) for spec in presses if spec != "none"}
    maps = {}
    if sharing:
        from kvforge.sharing import preset_maps

        maps = preset_maps(list(sharing), model.config, sharing_warmup)
    grid = [(c, spec, r) for c in chunks for spec in ["none"] + [p for p in presses if p != "none"]
            for r in ([0.0] if spec == "none" or factories[spec].ratio_free else ratios)]
    for c, spec, r in grid:  # every (press, ratio, chunk) is checked before any try
        check_chunking(None if spec == "none" else factories[spec](r), c)
    limit_bytes = None if memory_limit_gb is None else int(memory_limit_gb * 1e9)
    positions = model_max_length(model) or 1 << 20
    out_dir = prepare_out(out)
    device = next(model.parameters()).device
    keys = ["press", "compression_ratio", "prefill_chunk", "batch" if what == "context" else "context",
            "memory_limit_gb", "searched_up_to", "kv_layers"]
    done = _done_rows(out_dir / "capacity.jsonl", keys)
    rows = []
    runs = [(model, chunk, spec, ratio, None) for chunk, spec, ratio in grid]
    runs += [(None, None, f"sharing:{name}", 0.0, layer_map) for name, layer_map in maps.items()]
    top = limit or (positions - new_tokens if what == "context" else 4096)
    sizes = contexts if what == "batch" else [None]
    for run_model, chunk, spec, ratio, layer_map in runs:
        settings = {c: (spec, ratio, chunk, batch if what == "context" else c, memory_limit_gb, top,
                        layer_map or "dense") for c in sizes}  # a row's identity, as `keys` reads it back
        press = None if spec == "none" or layer_map is not None else factories[spec](ratio)
        for context in sizes:
            if settings[context] in done:  # found by an earlier run
                rows.append(done[settings[context]])
                print(json.dumps(done[settings[context]]))
                continue
            if run_model is None:  # a sharing preset: its model is built only when something is left to search
                from kvforge.sharing import random_sharing_model

                run_model = random_sharing_model(model, layer_map)
            label = f"{spec} {ratio} chunk={chunk}" + ("" if context is None else f" context={context}")
            with memory_cap(device, limit_bytes):
                if what == "context":
                    found, peak, tries = _search(lambda n: (batch, n), run_model, press, chunk, limit_bytes,
                                                 new_tokens, start or 4 * step, top, step, label)
                else:
                    found, peak, tries = _search(lambda n, c=context: (n, c), run_model, press, chunk, limit_bytes,
                                                 new_tokens, start or 1, top, 1, label)
            row = {"press": spec, "compression_ratio": ratio, "prefill_chunk": chunk,
                   "batch": batch if what == "context" else found, "context": found if what == "context" else context,
                   f"max_{what}": found, "peak_gb_at_max": None if peak is None else round(peak / 1e9, 3),
                   "searched_up_to": top, "tries": tries, "memory_limit_gb": memory_limit_gb,
                   "device": device_name(model), "kv_layers": layer_map or "dense"}
            rows.append(row)
            print(json.dumps(row))
            with (out_dir / "capacity.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        if layer_map is not None and run_model is not None:
            del run_model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    write_text_atomic(out_dir / "capacity.json", json.dumps({"what": what, "rows": rows}, indent=2))
    write_csv_atomic(out_dir / "capacity.csv", rows, list(rows[0]))
    return rows


def _search(shape: Callable[[int], tuple[int, int]], model, press, chunk: int | None, limit_bytes: int | None,
            new_tokens: int, start: int, top: int, step: int, label: str = "") -> tuple[int, int | None, int]:
    """`largest_fitting` over sizes n run as (batch, context) = `shape(n)`: (the size found, its peak in bytes or
    None, the number of tries). Each try is reported on stderr as it ends."""
    peaks: dict[int, int | None] = {}

    def try_size(n: int) -> bool:
        t0 = time.perf_counter()
        ok, peaks[n] = fits(model, press, *shape(n), chunk, limit_bytes, new_tokens)
        peak = "out of memory" if peaks[n] is None else f"peak {peaks[n] / 1e9:.2f} GB"
        print(f"  {label}: (batch, context) {shape(n)} {'fits' if ok else 'does not fit'} ({peak}, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        return ok

    found = largest_fitting(try_size, start, top, step)
    return found, peaks.get(found), len(peaks)
