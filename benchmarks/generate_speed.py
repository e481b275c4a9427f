"""Answer decoding speed: transformers' `generate` through a KVCache vs `graph_generate` (one captured step
per token), from the same prefilled and compressed cache, and whether they produce the same ids.

    PYTHONPATH=src python benchmarks/generate_speed.py --random-weights --config llama3.1-8b --context 32768
    PYTHONPATH=src python benchmarks/generate_speed.py --model smollm2-135m --context 2000 --device cuda

Writes `--out` (JSON): per press, ms per new token on each path — all in, and steady (the time of N tokens
minus that of 2, over N - 2: the question feed, the warm-up step and the graph capture are paid once per call;
each path is first run once untimed, so kernel compilation and library set-up, paid once per process, are in
neither) — the speed-up and the share of equal ids.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvforge import KVCache, get_press
from kvforge.generate import graph_generate, prefill
from kvforge.models import load_model


def _timed(fn, device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--config", default="llama3.1-8b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--question", type=int, default=16, help="question tokens fed after the context")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--presses", default="none,knorm,adakv:knorm")
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="generate_speed.json")
    args = ap.parse_args()
    model, _ = load_model(args.config if args.random_weights else args.model, random_weights=args.random_weights,
                          device=args.device or "auto")
    dev = next(model.parameters()).device
    model.generation_config.eos_token_id = None  # full-length answers: equal work on both paths
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ctx = torch.randint(100, vocab - 1, (1, args.context), generator=gen).to(dev)
    q = torch.randint(100, vocab - 1, (1, args.question), generator=gen).to(dev)
    ids = torch.cat([ctx, q], 1)
    rows = []
    for spec in args.presses.split(","):
        name, _, inner = spec.partition(":")
        press = None if name == "none" else (get_press(name, compression_ratio=args.ratio, press=inner) if inner
                                             else get_press(name, compression_ratio=args.ratio))
        cache = KVCache(model, press=press, reserve=args.question + args.new_tokens + 8)
        prefill(model, ctx, torch.ones_like(ctx), cache)
        cache.armed = False
        state = cache.snapshot()

        def hf(k: int) -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                      max_new_tokens=k, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=0)[:, ids.shape[1]:]

        times = {}
        for path, fn in (("hf", hf), ("graph", lambda k: graph_generate(model, cache, q, ctx.shape[1], k, 0))):
            # an untimed 2-token call first (kernel compilation, library set-up: once per process), then 2 tokens
            # (what every call pays once: question, warm-up + capture step), then N
            for k in ("warm-up", 2, args.new_tokens):
                out, times[path, k] = _timed(lambda k=k: fn(2 if k == "warm-up" else k), dev)
                cache.restore(state)
            if path == "hf":
                ref = out
            else:
                fast = out
        n = min(ref.shape[1], fast.shape[1])
        steady = {p: (times[p, args.new_tokens] - times[p, 2]) / max(args.new_tokens - 2, 1) for p in ("hf", "graph")}
        row = {"press": spec, "ratio": 0.0 if press is None else args.ratio, "context": args.context,
               "new_tokens": args.new_tokens,
               "hf_generate_ms_per_token": round(times["hf", args.new_tokens] / n * 1e3, 3),
               "graph_generate_ms_per_token": round(times["graph", args.new_tokens] / n * 1e3, 3),
               "speedup": round(times["hf", args.new_tokens] / times["graph", args.new_tokens], 2),
               "hf_first_two_s": round(times["hf", 2], 3), "graph_first_two_s": round(times["graph", 2], 3),
               "hf_steady_ms_per_token": round(steady["hf"] * 1e3, 3),
               "graph_steady_ms_per_token": round(steady["graph"] * 1e3, 3),
               "equal_ids": round(float((ref[:, :n] == fast[:, :n]).float().mean()), 3),
               "first_divergence": next((i for i in range(n) if ref[0, i] != fast[0, i]), None)}
        rows.append(row)
        print(json.dumps(row))
    meta = {"model": args.config if args.random_weights else args.model, "device": str(dev),
            "dtype": str(next(model.parameters()).dtype)}
    json.dump({"meta": meta, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
