"""Decoding with sliding layers: transformers' `DynamicSlidingWindowLayer` against kvforge's `WindowLayer`, one run.

    PYTHONPATH=src python benchmarks/window_layer_decode.py --preset yoco --config llama3.2-1b --batch 16 \\
        --prompt 2048 --new-tokens 64 --device cuda --out window_layer_decode.json

The same random-weight sharing model (`sharing_throughput.build`) decodes the same prompts twice through
`model.generate` and a `KVCache`: once with the cache's sliding layers built as the stock layer (the layer kind
`sliding_attention` registered back to it for that run), once as `WindowLayer` (the default). Reported: ms per decode
step (the prefill excluded, timed inside the same generation) for each, their ratio, and whether both generated the
same tokens (they must: the layers store the same entries). Alternating repeats (`--repeats`), median kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvforge import KVCache
from kvforge.cache.plan import register_layer_kind
from kvforge.cache.window import WindowLayer

sys.path.insert(0, str(Path(__file__).parent))
from sharing_throughput import build  # noqa: E402  (the models of the throughput table)


class _Clock(LogitsProcessor):
    """Time of the first logits request: the prefill's end."""

    def __init__(self, sync) -> None:
        self.t, self.sync = None, sync

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.sync()
            self.t = time.perf_counter()
        return scores


def decode_ms(model, ids: torch.Tensor, new: int, chunk: int | None, sync) -> tuple[float, torch.Tensor]:
    clock = _Clock(sync)
    with torch.inference_mode():
        cache = KVCache(model, reserve=new + 8)
        sync()
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, prefill_chunk_size=chunk, logits_processor=LogitsProcessorList([clock]))
        sync()
        end = time.perf_counter()
    return (end - clock.t) * 1e3 / (new - 1), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="yoco")
    ap.add_argument("--config", default="llama3.2-1b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sliding-window", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.new_tokens < 2 or args.batch < 1 or args.repeats < 1:
        raise SystemExit("--new-tokens must be at least 2, --batch and --repeats at least 1")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # as sharing_throughput.py

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    model = build(args.preset, args.config, getattr(torch, args.dtype), args.device, 2, args.sliding_window)
    ids = torch.randint(10, 30000, (args.batch, args.prompt), device=args.device)
    kinds = {"stock": DynamicSlidingWindowLayer, "window": WindowLayer}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    outs = {}
    decode_ms(model, ids[:, :64], 4, None, sync)  # untimed: kernels loaded
    try:
        for _ in range(args.repeats):
            for name, cls in kinds.items():
                register_layer_kind("sliding_attention", lambda cfg, i, reserve, cls=cls: cls(cfg.sliding_window))
                ms, outs[name] = decode_ms(model, ids, args.new_tokens, args.prefill_chunk, sync)
                times[name].append(ms)
                print(f"{name}: {ms:.2f} ms/step", flush=True)
    finally:
        register_layer_kind("sliding_attention", lambda cfg, i, reserve: WindowLayer(cfg.sliding_window))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"preset": args.preset, "config": args.config, "batch": args.batch, "prompt": args.prompt,
           "new_tokens": args.new_tokens, "sliding_window": args.sliding_window, "dtype": args.dtype,
           "device": torch.cuda.get_device_name() if cuda else args.device, "ms_per_step": med,
           "runs": times, "stock_over_window": round(med["stock"] / med["window"], 3),
           "same_tokens": bool(torch.equal(outs["stock"], outs["window"]))}
    print(json.dumps(row))
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
