"""Where a cross-layer sharing model's decode step goes: the CUDA kernels of a few steps at one batch, per preset.

    PYTHONPATH=src python benchmarks/profile_sharing_decode.py --config llama3.1-8b --presets dense,yoco \\
        --batch 128 --prompt 2048 --steps 4 --out profile_sharing_decode.json

Each model is built as `sharing_throughput.py` builds it (random weights, the named config's shapes), a batch of
random prompts is prefilled in chunks through `model.generate` and a `KVCache` (one new token, untimed), then
`--steps` more tokens are generated under the profiler, the same `generate` path the throughput table times. Printed
per preset: wall ms per step, GPU ms per step, and the kernels with the most GPU time (ms per step, calls per step),
next to the bytes floor of a step (weights + the KV every layer reads once); the same goes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from kvforge import KVCache

sys.path.insert(0, str(Path(__file__).parent))
from sharing_throughput import build  # noqa: E402  (the same models as the throughput table)


def read_bytes(model, batch: int, length: int) -> int:
    """Bytes one decode step must read at least: the weights once, and for every layer the KV it attends to
    (its source's entries, capped at the window for sliding layers), `length` tokens per row."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    entry = 2 * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    lm = getattr(cfg, "layer_map", None)
    window = getattr(cfg, "sliding_window", None) or length
    per_layer = [min(length, window) if lm is not None and lm.sliding[i] else length
                 for i in range(cfg.num_hidden_layers)]
    return weights + batch * entry * sum(per_layer)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile(model, batch: int, prompt: int, steps: int, chunk: int | None, top: int) -> dict:
    ids = torch.randint(10, 30000, (batch, prompt), device=next(model.parameters()).device)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        cache = KVCache(model, reserve=steps + 16)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=1, prefill_chunk_size=chunk, **kw)
        model.generate(out, past_key_values=cache, max_new_tokens=2, min_new_tokens=2, **kw)  # untimed steps
        seq = torch.randint(10, 30000, (batch, cache.get_seq_length() + 1), device=ids.device)
        sync()
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if ids.is_cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            t = time.perf_counter()
            model.generate(seq, past_key_values=cache, max_new_tokens=steps, min_new_tokens=steps, **kw)
            sync()
            wall = time.perf_counter() - t
    kernels: dict = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():  # CUDA kernels on a GPU; on the CPU (a smoke test), ops by their own time
        if evt.device_type == torch.autograd.DeviceType.CUDA or not ids.is_cuda:
            row = kernels[evt.name[:90]]
            row[0] += (evt.device_time if ids.is_cuda else evt.self_cpu_time_total) / 1e3
            row[1] += 1
    gpu = sum(v[0] for v in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    floor = read_bytes(model, batch, cache.get_seq_length())
    return {"batch": batch, "context": cache.get_seq_length(), "steps": steps, "wall_ms_per_step": wall * 1e3 / steps,
            "gpu_ms_per_step": gpu / steps, "floor_gb_per_step": floor / 1e9,
            "kernels": [{"kernel": k, "ms_per_step": round(ms / steps, 3), "calls_per_step": round(n / steps, 1)}
                        for k, (ms, n) in ranked]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="llama3.1-8b")
    ap.add_argument("--presets", default="dense,yoco")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "kvforge"])
    ap.add_argument("--sliding-window", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2, help="lckv warm-up layers")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs (op times)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_sharing_decode.py profiles CUDA kernels: run it on a CUDA machine (or --device cpu)")
    if args.batch < 1 or args.steps < 1:
        raise SystemExit(f"--batch {args.batch} / --steps {args.steps}: both must be at least 1")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as sharing_throughput.py (cuDNN rebuilds a graph per length)
    rows = []
    for name in args.presets.split(","):
        model = build(name, args.config, torch.bfloat16, args.device, args.warmup, args.sliding_window, args.attention)
        r = {"preset": name, "attention": args.attention} | profile(model, args.batch, args.prompt, args.steps,
                                                                      args.prefill_chunk, args.top)
        bw = r["floor_gb_per_step"] / (r["wall_ms_per_step"] / 1e3)
        print(f"\n{name} ({args.attention}) batch {r['batch']} at {r['context']} tokens: {r['wall_ms_per_step']:.1f} "
              f"ms/step wall, {r['gpu_ms_per_step']:.1f} ms GPU; floor {r['floor_gb_per_step']:.1f} GB/step "
              f"({bw:.0f} GB/s achieved on it)")
        for k in r["kernels"]:
            print(f"  {k['ms_per_step']:8.2f} ms {k['calls_per_step']:6.1f}x  {k['kernel']}")
        rows.append(r)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
            "torch": torch.__version__, "config": args.config,
            "prompt": args.prompt, "prefill_chunk": args.prefill_chunk}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, args.out)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
