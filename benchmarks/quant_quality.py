"""Quantization quality on the embedded model: KIVI, GEAR and KVQuant-style at 4 and 2 bits versus
full precision, on the demo tasks and perplexity, in one `run_eval` (one prefill per sample, every quantizer
coding a fork of it).

    python benchmarks/quant_quality.py                                   # CPU, demo-sized
    python benchmarks/quant_quality.py --device cuda --samples 10 --model /path/SmolLM2-135M-Instruct.Q4_1.gguf

Writes the eval directory and `quant_quality.md` (a table: score per task, perplexity, KV bytes vs baseline).
Group size 32 and residual 128 (KIVI's defaults) unless given; `snapkv+kivi@bits=2` shows eviction composed
with quantization at ratio 0.5.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from kvforge.eval.runner import run_eval, write_summary
from kvforge.models import load_model

TASKS = ["niah_single_1", "niah_multikey_1", "facts_qa", "ppl"]
PRESSES = ["kivi@bits=4", "kivi@bits=2", "gear@bits=4", "gear@bits=2", "kvquant@bits=4", "kvquant@bits=2",
           "snapkv+kivi@bits=2"]


def table(rows: list[dict]) -> str:
    by: dict[str, dict] = defaultdict(dict)
    for r in rows:
        by[r["press"]][r["task"]] = r
    head = "| method | " + " | ".join(TASKS) + " | KV bytes vs bf16/fp32 |\n|---|" + "---|" * (len(TASKS) + 1)
    lines = [head]
    for press, per in sorted(by.items(), key=lambda kv: kv[0] != "none"):
        cells = []
        for t in TASKS:
            r = per.get(t)
            cells.append("–" if r is None or r["score"] is None else f"{r['score']:.3f}")
        fr = [r["kv_fraction"] for r in per.values() if r.get("kv_fraction") is not None]
        lines.append(f"| {press} | " + " | ".join(cells) + f" | {sum(fr) / len(fr):.3f} |" if fr else
                     f"| {press} | " + " | ".join(cells) + " | 1.000 |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--samples", type=int, default=None, help="per task (default: the demo's counts, ppl 2)")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--out", default="runs/quant_quality")
    args = ap.parse_args()
    model, tok = load_model(args.model, device=args.device)
    samples = ({t: args.samples for t in TASKS} if args.samples else
               {"niah_single_1": 3, "niah_multikey_1": 2, "facts_qa": 1, "ppl": 2})
    run_eval(args.model, TASKS, PRESSES, [0.5], args.length, samples, args.out, model=model, tokenizer=tok,
             max_new_tokens=16, argv=["benchmarks/quant_quality.py"], press_batch=8)
    rows = write_summary(args.out)
    md = (f"Model {args.model} ({next(model.parameters()).dtype}, {torch.device(args.device or 'cpu')}), "
          f"{args.length} tokens, samples {samples}; scores: accuracy (ppl: perplexity, lower is better).\n\n"
          + table(rows))
    Path(args.out, "quant_quality.md").write_text(md + "\n", encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
