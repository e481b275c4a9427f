"""On a CUDA GPU: the compiled captured decode step (dynamic KV length, `kvforge::dense_decode_attention`) decodes
the tokens of the uncompiled captured step, for none / knorm (dense layers) and adakv (packed), at two context
lengths, and the second length compiles nothing new (an inductor cache hit). A quick check before timing the default
path; prints one line per case and exits 1 on a mismatch.

    PYTHONPATH=src python3 benchmarks/check_compiled_decode.py [--mode max-autotune-no-cudagraphs]
"""

import argparse
import sys

import torch
from torch._dynamo.utils import counters

from kvforge import KVCache, get_press
from kvforge.cache.graphs import GraphDecoder
from kvforge.generate import prefill
from kvforge.models import tiny_model


def decode(model, ids, press, compile, steps=12):
    cache = KVCache(model, press=press, reserve=steps + 8)
    logits = prefill(model, ids, torch.ones_like(ids), cache)
    cache.armed = False
    dec = GraphDecoder(model, cache, ids.shape[1], steps, ids.shape[0], compile=compile)
    tok, out = logits.argmax(-1, keepdim=True), []
    for _ in range(steps):
        tok = dec.step(tok).argmax(-1, keepdim=True)
        out.append(tok[:, 0].tolist())
    dec.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="on", help="'on' (inductor's default mode) or an inductor mode name")
    ap.add_argument("--device", default="cuda", help="cuda (captured steps) or cpu (the same steps, uncaptured)")
    args = ap.parse_args()
    compile = True if args.mode == "on" else args.mode
    model = tiny_model("llama").to(args.device, torch.float32)
    bad = 0
    for press_name in ("none", "knorm", "adakv"):
        for length in (300, 437):
            press = None if press_name == "none" else get_press(press_name, compression_ratio=0.5)
            ids = torch.randint(5, 900, (2, length), generator=torch.Generator().manual_seed(length)).to(args.device)
            want = decode(model, ids, press, False)
            counters.clear()
            got = decode(model, ids, press, compile)
            hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
            ok = got == want
            bad += not ok
            print(f"{press_name:6s} {length}: tokens {'equal' if ok else 'DIFFER'}; inductor cache hits {hits}, "
                  f"misses {misses}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
