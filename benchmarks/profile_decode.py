"""Where a decode step's time goes: CUDA kernels of CUDA-graph-replayed decode steps, grouped by name.

    PYTHONPATH=src python benchmarks/profile_decode.py --context 32768 --press knorm --ratio 0.75 \
        [--compile [max-autotune-no-cudagraphs]]

Random-weight Llama-3.1-8B (bf16); prints the top kernels by total GPU time per step, the sum grouped (GEMMs,
attention split and merge kernels, everything else), the step's wall time (the rest is replay gaps) and the
bytes floor; writes `--out` (JSON) with the same table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from kvforge import KVCache, get_press
from kvforge.cache.graphs import GraphDecoder
from kvforge.eval.bench import copy_bandwidth
from kvforge.generate import prefill
from kvforge.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama3.1-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--press", default=None)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", nargs="?", const=True, default=False,
                    help="torch.compile the step before capture; optionally an inductor mode, e.g. "
                         "max-autotune-no-cudagraphs (tuned GEMMs, as `kvforge bench --compile max-autotune`)")
    ap.add_argument("--out", default="profile_decode.json")
    args = ap.parse_args()
    model, _ = load_model(args.config, random_weights=True, device="cuda")
    ids = torch.randint(100, 30000, (1, args.context), device="cuda")
    press = get_press(args.press, compression_ratio=args.ratio) if args.press else None
    cache = KVCache(model, press=press, reserve=2 * args.steps + 16)
    tok = prefill(model, ids, torch.ones_like(ids), cache).argmax(-1, keepdim=True)
    cache.armed = False
    dec = GraphDecoder(model, cache, ids.shape[1], 2 * args.steps + 4, 1, compile=args.compile)
    for _ in range(3):
        tok = dec.step(tok).argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        tok = dec.step(tok).argmax(-1, keepdim=True)
    stop.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(stop) / args.steps  # ms per step, outside the profiler
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tok = dec.step(tok).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    dec.close()
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time_total / args.steps / 1e3  # ms per step
            per[e.name][1] += 1
    rows = sorted(([n[:90], round(ms, 4), c // args.steps] for n, (ms, c) in per.items()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(torch.device("cuda"))
    kv = cache.stats()["bytes"]
    print(f"GPU kernel time per step {total:.3f} ms; kernels per step {sum(r[2] for r in rows)}; floor "
          f"{(wbytes + kv) / bw * 1e3:.3f} ms (weights {wbytes / bw * 1e3:.3f}, KV {kv / bw * 1e3:.3f})")
    groups = defaultdict(float)
    for name, ms, _ in rows:
        groups[kernel_group(name)] += ms
    groups["replay gaps (wall - kernels)"] = wall - total
    print(f"step wall time {wall:.3f} ms:", ", ".join(f"{k} {v:.3f}" for k, v in groups.items()))
    for name, ms, count in rows[:25]:
        print(f"{ms:8.4f} ms  x{count:4d}  {name}")
    json.dump({"args": vars(args), "total_ms": total, "wall_ms": wall, "groups": groups, "rows": rows},
              open(args.out, "w"), indent=1)


def kernel_group(name: str) -> str:
    """GEMMs (cuBLAS nvjet/cutlass, inductor's tuned mm templates, split-K reduces), our attention kernels, or
    everything else (inductor's fused elementwise kernels, copies)."""
    low = name.lower()
    if "_split_kernel" in low or "_quant_split" in low:
        return "attention split"
    if "_merge_kernel" in low:
        return "attention merge"
    if any(k in low for k in ("nvjet", "gemm", "cutlass", "sm90_xmma", "triton_tem_fused_mm", "mm_",
                              "splitkreduce")):
        return "GEMMs"
    return "everything else"


if __name__ == "__main__":
    main()
