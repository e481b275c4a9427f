"""Every method at compression ratio 0.5 next to the uncompressed baseline, on the demo tasks.

    .venv/bin/python benchmarks/method_table.py [--out runs/methods05] [--samples N] [--model M.gguf --device cuda
        --cuda-graph]

SmolLM2-135M on CPU, the earlier demo's tasks and samples (niah_single_1 ×3, niah_multikey_1 ×2, facts_qa ×1 at 2k
tokens), one prefill per sample; prefill presses at ratio 0.5, decode-time presses (h2o, tova_decode,
scissorhands, decoding over knorm, quest) at 0.5 of the context, ratio-free ones (quantizers, minicache) once.
Writes the eval directory (results.jsonl, summary.csv, report.html) and `method_table.md` in it.
Interrupted runs resume.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from kvforge.eval.runner import run_eval, write_summary

DEMO_TASKS = {"niah_single_1": 3, "niah_multikey_1": 2, "facts_qa": 1}  # task -> samples (the demo's before #22)
DEMO_LENGTH = 2000
DEMO_MAX_NEW_TOKENS = 16

PRESSES = [
    # prefill scoring
    "random", "streamingllm", "knorm", "l2norm", "snapkv", "pyramidkv", "adakv", "headkv", "tova", "h2o",
    "observed_attention", "expected_attention", "nacl", "kvzip", "chunk:snapkv",
    # merging
    "cam", "kvmerger", "merge:knorm",
    # channel / layer / quantization
    "think", "minicache", "kivi@bits=4", "kivi@bits=2", "gear", "kvquant", "snapkv+kivi@bits=4",
    # decode-time and selection
    "tova_decode", "scissorhands", "decoding@press=knorm", "quest",
]


def table(rows: list[dict]) -> str:
    by_press: dict[str, dict] = defaultdict(dict)
    tasks = list(DEMO_TASKS)
    for r in rows:
        by_press[r["press"]][r["task"]] = r
    lines = ["| method | " + " | ".join(tasks) + " | mean | KV bytes vs baseline |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for press, per in by_press.items():
        scores = [per[t]["score"] for t in tasks if t in per and per[t]["score"] is not None]
        fr = [per[t]["kv_fraction"] for t in tasks if t in per and per[t].get("kv_fraction") is not None]
        cells = [f"{per[t]['score']:.2f}" if t in per and per[t]["score"] is not None else "–" for t in tasks]
        mean = f"{sum(scores) / len(scores):.2f}" if scores else "–"
        frac = f"{sum(fr) / len(fr):.2f}" if fr else "–"
        lines.append(f"| {press} | " + " | ".join(cells) + f" | {mean} | {frac} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/methods05")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--model", default="smollm2-135m", help="alias, directory or .gguf (the GPU gets the GGUF)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--samples", type=int, default=None, help="per task (default: DEMO_TASKS' counts)")
    ap.add_argument("--cuda-graph", action="store_true", help="decode answers by replaying captured steps")
    args = ap.parse_args()
    from kvforge.models import load_model

    model, tok = load_model(args.model, device=args.device)
    samples = dict(DEMO_TASKS) if args.samples is None else dict.fromkeys(DEMO_TASKS, args.samples)
    run_eval(args.model, list(DEMO_TASKS), PRESSES, [args.ratio], DEMO_LENGTH, samples, args.out,
             max_new_tokens=DEMO_MAX_NEW_TOKENS, argv=sys.argv, press_batch=16, model=model, tokenizer=tok,
             cuda_graph=args.cuda_graph)
    rows = write_summary(args.out)
    md = table(rows)
    Path(args.out, "method_table.md").write_text(md + "\n", encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
