"""Where a prefill press's time goes: the CUDA kernels and host time inside every layer's `compress`, by op.

    PYTHONPATH=src python benchmarks/profile_press.py --context 131072 --presses knorm,snapkv,tova,adakv:snapkv \\
        --ratio 0.75 [--chunk 8192] --out profile_press.json

Random-weight Llama-3.1-8B (bf16). Each press is run once on a short context (kernels loaded), then twice at
`--context` without the profiler: `press_ms`, the host clock with the device synchronised around each `compress`
(every host instruction exposed: an upper bound), and `press_stream_ms`, as `kvforge bench` times it (CUDA events
around each call, nothing synchronised: the kernels and the device's waits for the host inside the call); then once
under the profiler (synchronised). For the profiled run it prints, per op inside the `kvforge.compress`
ranges (summed over layers): GPU time of its own kernels, host time, calls. It writes the same to `--out`. What
`press_ms` holds beyond the kernels is host time: Python, launches and host syncs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch

from kvforge import KVCache
from kvforge.attention.function import COMPRESS_RANGE
from kvforge.generate import prefill
from kvforge.models import load_model
from kvforge.presses.registry import parse_press


def timed_prefill(model, ids: torch.Tensor, press, chunk: int | None, sync: bool = True) -> tuple[float, float]:
    """(seconds in `compress`, seconds of the whole prefill) over one prefill. `sync`: the host clock around each
    call with the device synchronised (every host instruction exposed: an upper bound); else `kvforge bench`'s
    measure, CUDA events around each call and nothing synchronised (`KVCache.press_time`)."""
    cache = KVCache(model, press=press, reserve=8, chunk_size=chunk)
    cache.press_seconds = 0.0
    cache.press_sync = sync
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        prefill(model, ids, torch.ones_like(ids), cache)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return cache.press_time(), time.perf_counter() - t0


def ops_inside(prof) -> tuple[dict, float, int]:
    """{op: [gpu_ms, host_ms, calls]} for the ops directly under the compress ranges (their kernels included: an
    op's device time counts every kernel it or its children launched), the ranges' total host ms, and the count."""
    ops: dict = defaultdict(lambda: [0.0, 0.0, 0])
    host, n = 0.0, 0
    for evt in prof.events():
        if evt.name != COMPRESS_RANGE:
            continue
        n += 1
        host += evt.cpu_time_total / 1e3
        for child in evt.cpu_children:
            row = ops[child.name]
            row[0] += child.device_time_total / 1e3
            row[1] += child.cpu_time_total / 1e3
            row[2] += 1
    return dict(ops), host, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama3.1-8b")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--presses", default="knorm,snapkv,tova,adakv:snapkv")
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="profile_press.json")
    args = ap.parse_args()
    model, _ = load_model(args.config, random_weights=True, device=args.device)
    ids = torch.randint(100, 30000, (1, args.context), device=args.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    results = []
    for spec in args.presses.split(","):
        factory = parse_press(spec)  # as `kvforge bench` builds it (`adakv:snapkv`: a wrapper and its inner press)

        def make():
            return factory(args.ratio)

        timed_prefill(model, ids[:, :256], make(), None if args.chunk is None else 128)  # kernels loaded
        press_s, prefill_s = timed_prefill(model, ids, make(), args.chunk)
        stream_s, stream_prefill_s = timed_prefill(model, ids, make(), args.chunk, sync=False)
        press_ms = press_s * 1e3
        with torch.profiler.profile(activities=activities) as prof:
            timed_prefill(model, ids, make(), args.chunk)
        ops, host_ms, calls = ops_inside(prof)
        gpu_ms = sum(v[0] for v in ops.values())
        top = sorted(ops.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))
        print(f"\n{spec} {args.ratio} at {args.context} (chunk {args.chunk}): press_ms {press_ms:.1f} synchronised "
              f"({press_s / prefill_s:.2%} of {prefill_s:.2f} s), {stream_s * 1e3:.1f} by stream events "
              f"({stream_s / stream_prefill_s:.2%} of {stream_prefill_s:.2f} s); profiled: {calls} compress calls, "
              f"host {host_ms:.1f} ms, their ops' GPU time {gpu_ms:.1f} ms")
        print(f"  {'op':<44} {'GPU ms':>9} {'host ms':>9} {'calls':>6}")
        for op, (g, h, c) in top[:15]:
            print(f"  {op[:44]:<44} {g:9.2f} {h:9.2f} {c:6d}")
        results.append({"press": spec, "ratio": args.ratio, "context": args.context, "chunk": args.chunk,
                        "press_ms": round(press_ms, 2), "prefill_s": round(prefill_s, 3),
                        "press_stream_ms": round(stream_s * 1e3, 2), "stream_prefill_s": round(stream_prefill_s, 3),
                        "profiled_host_ms": round(host_ms, 2),
                        "profiled_gpu_ms": round(gpu_ms, 2), "calls": calls,
                        "ops": [{"op": op, "gpu_ms": round(g, 3), "host_ms": round(h, 3), "calls": c}
                                for op, (g, h, c) in top]})
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    meta = {"device": device, "torch": torch.__version__, "config": args.config}
    with open(args.out + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
