"""Generation throughput of cross-layer KV sharing: the dense Llama vs each preset, random weights, same run.

    PYTHONPATH=src python benchmarks/sharing_throughput.py --config llama3.2-1b --out runs/sharing_tp_1b.jsonl
    PYTHONPATH=src python benchmarks/sharing_throughput.py --config llama3.1-8b --out runs/sharing_tp_8b.jsonl

For each model (the dense `LlamaForCausalLM` and a `KVSharingForCausalLM` per preset, both with the named
config's shapes and i.i.d. random weights) and batch sizes 1, 2, 4, ... until CUDA runs out of memory: a random
prompt of `--prompt` tokens, then `--new-tokens` greedy tokens through `model.generate` and a `KVCache` (every row
generates all of them). One JSON line per (model, batch): seconds of the prefill (until generate asks for the
first token's logits, in the same generation) and of the whole generation, generated tokens/s (batch x new tokens /
whole generation, the LCKV paper's throughput), decode tokens/s (without the prefill), peak GPU memory, KV bytes
after generation (`KVCache.stats()`), or `"oom": true`. Each model is
first run once at batch 1, untimed (kernel set-up); cuDNN's SDPA backend is off (see main()). Rows already in
`--out` for the same set-up are skipped, so a stopped run resumes. The summary printed at the end: largest batch
that fits and its tokens/s, per model.

Batch sizes grow by `--growth` until the first out-of-memory, then the gap between the last batch that fit and
that one is bisected until it is at most 1/`--resolution` of the former (`--resolution 0`: no bisection).
`--batches 256,192` measures exactly those batch sizes, in that order, in one process instead.

`--probe` makes the search cheap. Memory probes (a prompt of `--prompt` + `--new-tokens` tokens, the same chunks,
one new token; a model with upward-pointing layers makes one pass per chunk instead of m + b, which changes its
time, not what a pass holds; rows marked `"probe": true`, never timed) at `--min-batch` and twice that give the
peak's line in the batch (weights + per-row bytes), and the line the batch where the peak reaches the card's memory
less 1 GiB (`predict`). Timed runs, the table's rows, then settle the limit: 8% under the prediction and a quarter
above that (with `--resolution 4`), further runs only where a timed run disagrees (`refine`). The probe holds the
whole final cache during a prefill chunk, so its peak is at least the timed run's; the timed runs decide.
`--probe-only` stops at the prediction, checked by two more probes (for lckv, whose timed runs take minutes).

`--prefill-chunk N` prefills the prompt N tokens at a time (transformers' `prefill_chunk_size`, every model alike),
so activations are bounded by batch x N and the KV cache, not the prefill, decides the largest batch. Without it
the whole batch's 2k-token prompt runs in one forward and its activations (the MLP's, ~3x its width per token)
dominate the peak at large batch. A sharing model with upward-pointing layers (lckv) iterates each chunk (m + b
passes), so its chunked prefill is an iteration of different length than its unchunked one; speed is what this
measures (its exactness is tested in tests/test_sharing*).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.initialization import no_init_weights

from kvforge import KVCache
from kvforge.cache.plan import register_layer_kind
from kvforge.models import random_config
from kvforge.sharing import KVSharingConfig, preset

PRESETS = ("dense", "lckv", "cla", "yoco", "mixattention")


def build(name: str, config: str, dtype: torch.dtype, device: str, warmup: int, window: int,
          attention: str = "sdpa"):
    """A random-weight model: the dense config, or its KVSharingConfig with the preset's layer map, running
    `attention` (transformers' "sdpa", or "kvforge": SDPA with enable_gqa, no repeat_kv copy of the KV)."""
    cfg = random_config(config)
    if name != "dense":
        fields = {k: v for k, v in cfg.to_dict().items()
                  if k not in ("model_type", "architectures", "transformers_version")}
        lm = preset(name, cfg.num_hidden_layers, warmup=warmup)
        cfg = KVSharingConfig(**fields, kv_layers=str(lm), sliding_window=window)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.tie_weights()
    bound = 0.02 * 3**0.5
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.uniform_(-bound, bound)
    model.set_attn_implementation(attention)
    return model.eval()


class _PrefillClock(LogitsProcessor):
    """Records when generate asks for the first token's logits: the prefill's end (one sync, first call only)."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.t is None:
            torch.cuda.synchronize()
            self.t = time.perf_counter()
        return scores


def run_once(model, batch: int, prompt: int, new: int, device: str, chunk: int | None = None,
             probe: bool = False) -> dict:
    """One generation of `new` tokens after a random `prompt`-token prompt at `batch` rows. `probe`: a memory probe
    instead (see the module doc): prompt + new tokens, one new token, one pass per chunk; peak memory only."""
    extra = {}
    if probe:
        prompt, new = prompt + new, 1
        if getattr(getattr(model.config, "layer_map", None), "has_upward", False):
            extra["num_iterations"] = 1
    torch.manual_seed(0)
    ids = torch.randint(10, 30000, (batch, prompt), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    clock = _PrefillClock()
    with torch.inference_mode():
        cache = KVCache(model, reserve=new + 8)
        t = time.perf_counter()
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, prefill_chunk_size=chunk, logits_processor=LogitsProcessorList([clock]),
                             **extra)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    assert out.shape[1] == prompt + new
    if probe:
        return {"probe": True, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    prefill = clock.t - t
    return {"prefill_s": round(prefill, 4), "total_s": round(total, 4),
            "tokens_per_s": round(batch * new / total, 2),
            "decode_tokens_per_s": round(batch * (new - 1) / max(total - prefill, 1e-9), 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3), "kv_bytes": cache.stats()["bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="llama3.2-1b", help="random-weight shapes: llama3.2-1b | llama3.1-8b")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated; dense = the stock Llama")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--min-batch", type=int, default=1, help="first batch size tried")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--growth", type=int, default=2, help="batch sizes 1, g, g², ... (4 halves the runs)")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes measured in this order in one process, instead of the search "
                         "(e.g. 256,192: does an out-of-memory leave memory behind for the next run?)")
    ap.add_argument("--warmup", type=int, default=2, help="lckv warm-up layers")
    ap.add_argument("--sliding-window", type=int, default=1024, help="window of yoco/mixattention sliding layers")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "kvforge"],
                    help="every model's attention: transformers' sdpa (expands GQA with repeat_kv when a mask is "
                         "given: a transient of the layer's KV x the group size) or kvforge's (SDPA with enable_gqa)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prefill N prompt tokens at a time (default: all)")
    ap.add_argument("--resolution", type=int, default=8,
                    help="bisect after the first out-of-memory until the gap is <= 1/R of the largest fit (0: off)")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="cap the memory this process may allocate (torch's per-process fraction), e.g. 78 to find "
                         "the largest batches of an 80 GB card on a larger one")
    ap.add_argument("--allocator", default="expandable", choices=["expandable", "default"],
                    help="PyTorch's CUDA allocator for every model alike: expandable segments (default; the default "
                         "allocator's fragmentation ran YOCO at 384 rows out of memory on an H100 with 17 GiB "
                         "reserved but unused) or the default one; an explicit PYTORCH_CUDA_ALLOC_CONF wins")
    ap.add_argument("--sliding-layer", default="window", choices=["window", "stock"],
                    help="the cache's sliding layers: kvforge's WindowLayer (default, appends in place) or "
                         "transformers' DynamicSlidingWindowLayer (concatenates every step), for A/B runs")
    ap.add_argument("--probe", action="store_true",
                    help="search with untimed memory probes, then time the limit's bracket (see the module doc)")
    ap.add_argument("--probe-only", action="store_true",
                    help="with --probe: the probes' limit only, no timed runs (lckv: minutes per timed run)")
    ap.add_argument("--out", required=True, help="JSON lines; re-run the same command to resume")
    args = ap.parse_args()
    if args.sliding_layer == "stock":  # the plan's sliding kind, for this process only
        register_layer_kind("sliding_attention", lambda cfg, i, reserve: DynamicSlidingWindowLayer(cfg.sliding_window))
    if args.allocator == "expandable":  # before the first CUDA allocation, which reads it
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else []
    except ValueError:
        raise SystemExit(f"--batches {args.batches!r}: give comma-separated positive integers, e.g. 256,192") from None
    if any(b < 1 for b in batches):
        raise SystemExit(f"--batches {args.batches!r}: every batch size must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("sharing_throughput.py measures GPU memory: run it on a CUDA machine")
    device, dtype = "cuda", getattr(torch, args.dtype)
    # torch 2.11 on the H200 sends SDPA with a boolean mask of a new length (every decode step) to cuDNN, which builds
    # a graph each time: ~3 ms of CPU per call, 50 ms per token for a 1B model. Off for every model alike.
    torch.backends.cuda.enable_cudnn_sdp(False)
    total = torch.cuda.get_device_properties(0).total_memory
    if args.memory_gib is not None:
        if not 0 < args.memory_gib * 2**30 <= total:
            raise SystemExit(f"--memory-gib {args.memory_gib}: must be > 0 and at most this GPU's {total / 2**30:.3f}")
        torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2**30 / total)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    setup = {"config": args.config, "prompt": args.prompt, "new_tokens": args.new_tokens, "dtype": args.dtype,
             "warmup": args.warmup, "sliding_window": args.sliding_window, "gpu": torch.cuda.get_device_name()}
    if args.memory_gib is not None:
        setup["memory_gib"] = args.memory_gib
    if args.sliding_layer != "window":  # rows without the key ran WindowLayer, or the stock layer before 12-07 19:23
        setup["sliding_layer"] = args.sliding_layer
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):  # rows without the key ran the default allocator
        setup["alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    if args.prefill_chunk:
        setup["prefill_chunk"] = args.prefill_chunk
    if args.attention != "sdpa":  # rows without the key ran sdpa (the tables before the option existed)
        setup["attention"] = args.attention

    def same(r: dict) -> bool:
        return (all(r.get(k) == v for k, v in setup.items()) and r.get("prefill_chunk") == args.prefill_chunk
                and r.get("attention", "sdpa") == args.attention)

    for name in args.presets.split(","):
        runs = {p: {r["batch"]: r for r in done if r["preset"] == name and same(r) and bool(r.get("probe")) == p}
                for p in (False, True)}
        model = None

        def measure(batch: int, probe: bool = False) -> bool:
            """True when `batch` fits (from `--out` when already measured); `probe`: a memory probe."""
            nonlocal model
            rows = runs[probe]
            if batch not in rows:
                if model is None:
                    model = build(name, args.config, dtype, device, args.warmup, args.sliding_window,
                                  args.attention)
                    run_once(model, 1, min(args.prompt, 64), 4, device)  # untimed: kernel set-up
                row = setup | {"preset": name, "batch": batch, **({"probe": True} if probe else {}),
                               "kv_layers": getattr(model.config, "kv_layers", None) or "dense"}
                try:
                    row |= run_once(model, batch, args.prompt, args.new_tokens, device, args.prefill_chunk, probe)
                except torch.cuda.OutOfMemoryError as e:  # what was asked for, and where: a transient or the KV?
                    # allocated vs reserved at the failure: live tensors, or blocks the allocator holds but cannot use
                    row |= {"oom": True, "oom_message": str(e).split(". Including")[0][:300],
                            "oom_where": oom_site(e),
                            "oom_allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                            "oom_reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}
                gc.collect()
                torch.cuda.empty_cache()
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                rows[batch] = row
                done.append(row)
            return not rows[batch].get("oom")

        if batches:
            for b in batches:
                measure(b)
        elif args.probe:
            first = measure(args.min_batch, probe=True) and measure(2 * args.min_batch, probe=True)
            pk = runs[True]
            if not first:
                raise SystemExit(f"{name}: --min-batch {args.min_batch} or twice it does not fit a probe; give a "
                                 "smaller one")
            cap = (args.memory_gib or total / 2**30) - 1.0
            limit = predict(args.min_batch, pk[args.min_batch]["peak_gib"], 2 * args.min_batch,
                            pk[2 * args.min_batch]["peak_gib"], cap)
            lo = max(1, min(args.max_batch, int(limit * 0.92)))
            hi = lo + max(1, lo // max(args.resolution, 1))
            print(f"{name}: probes predict {limit:.0f} rows at {cap:.1f} GiB; timing {lo} and {hi}", flush=True)
            if args.probe_only:
                measure(lo, probe=True)
                measure(hi, probe=True)
            else:
                refine(measure, lo, hi, args.max_batch, args.resolution)
        else:
            search(measure, args.growth, args.max_batch, args.resolution, args.min_batch)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    print(f"\n{args.config}, prompt {args.prompt}, {args.new_tokens} new tokens, prefill chunk "
          f"{args.prefill_chunk or 'none'}: largest batch that fits (first out-of-memory)")
    for name in args.presets.split(","):
        for probe in (False, True):
            rows = [r for r in done if r["preset"] == name and same(r) and bool(r.get("probe")) == probe]
            ok = [r for r in rows if not r.get("oom")]
            oom = [r["batch"] for r in rows if r.get("oom")]
            if ok:
                best = max(ok, key=lambda r: r["batch"])
                first_oom = min((b for b in oom if b > best["batch"]), default=None)
                speed = "memory probe" if probe else f"{best['tokens_per_s']:10.1f} tokens/s"
                print(f"  {name:13s} batch {best['batch']:5d}  {speed:>21s}  peak {best['peak_gib']:.1f} GiB  "
                      f"(oom at {first_oom or 'none up to --max-batch'})")


def oom_site(e: BaseException) -> str:
    """The innermost frames of this repository or transformers where an out-of-memory error was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames
            if "kvforge" in f.filename or "transformers" in f.filename]
    return " < ".join(reversed(ours[-3:]))


def search(fits, growth: int, max_batch: int, resolution: int, first: int = 1) -> int:
    """The largest batch <= `max_batch` for which `fits(batch)`: first, first·g, first·g², ... until one does not fit,
    then bisection of the gap until it is at most 1/`resolution` of the largest fit. 0 when `first` does not fit."""
    lo, hi, batch = 0, None, first
    while batch <= max_batch:
        if not fits(batch):
            hi = batch
            break
        lo = batch
        batch *= growth
    if hi is None and lo < max_batch and fits(max_batch):  # the cap itself, when the growth stepped over it
        lo = max_batch
    return bisect(fits, lo, hi, resolution)


def bisect(fits, lo: int, hi: int | None, resolution: int) -> int:
    """Narrow `lo` (fits) .. `hi` (does not; None: unknown) until the gap is at most 1/`resolution` of `lo`."""
    while resolution and hi is not None and lo and hi - lo > max(1, lo // resolution):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def predict(b1: int, peak1: float, b2: int, peak2: float, cap: float) -> float:
    """The batch at which a peak affine in the batch (through (b1, peak1) and (b2, peak2), GiB) reaches `cap`."""
    per_row = (peak2 - peak1) / (b2 - b1)
    if per_row <= 0:
        raise SystemExit(f"probe peaks {peak1} GiB at {b1} rows and {peak2} at {b2}: not growing with the batch")
    return b1 + (cap - peak1) / per_row


def refine(fits, lo: int, hi: int | None, max_batch: int, resolution: int) -> int:
    """The largest batch for which `fits` (timed runs), starting from a probe's bracket: `lo` fit the probe, `hi`
    (None: nothing failed up to `max_batch`) did not. Usually two runs, lo and hi; where a run disagrees with its
    probe, halve down from lo or double up from hi, then bisect to 1/`resolution` of the largest fit. 0: none fits."""
    if not fits(lo):
        hi, lo = lo, lo // 2
        while lo and not fits(lo):
            hi, lo = lo, lo // 2
    elif hi is not None and fits(hi):
        lo, hi = hi, None
        while lo * 2 <= max_batch:
            if not fits(lo * 2):
                hi = lo * 2
                break
            lo *= 2
    return bisect(fits, lo, hi, resolution)


if __name__ == "__main__":
    main()
