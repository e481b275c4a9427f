"""Eager decode step time per press, as a ratio to no compression in the same run.

    python benchmarks/decode_press_overhead.py                      # CPU, SmolLM2, 8 rows, ~600-token context
    python benchmarks/decode_press_overhead.py --device cuda --context 4000 --out runs/decode_overhead.csv

What the accuracy table's slow parts cost per decoded token: the decode-time presses (a hook per layer and step)
and the quantizers (codes read or decoded per step), each answered through `kvforge.generate.answer` exactly as
`kvforge eval` answers them, with a fixed answer length (end-of-sequence ignored) so every press decodes the same
number of steps. One warm-up answer per press; then `--steps` tokens timed. Columns: press, ms_per_step,
vs_none (the ratio to the uncompressed eager step), rows, context_tokens, device.
"""

from __future__ import annotations

import argparse
import csv
import io
import time

import torch

import kvforge
from kvforge.eval.runner import compress_prefilled, prefill_context
from kvforge.eval.runs import write_text_atomic
from kvforge.generate import answer, encode

PRESSES = ["none", "h2o", "scissorhands", "tova_decode", "quest", "kivi", "gear", "tova"]
SENTENCE = "The archive holds the parish registers and photographs of the harbour. "


def _press(spec: str, ratio: float):
    if spec == "none":
        return None
    press = kvforge.get_press(spec)
    return press if press.kind == "quantization" else kvforge.get_press(spec, compression_ratio=ratio)


def measure(model, tok, presses: list[str], rows: int, context: int, steps: int, ratio: float) -> list[dict]:
    """ms per decoded token for each press on one shared prefill of `rows` identical contexts."""
    words = max(1, context // len(tok(SENTENCE).input_ids))
    enc = encode(model, tok, [SENTENCE * words] * rows, [["Tell a long story about the archive."]] * rows,
                 [""] * rows, max_new_tokens=steps)
    full = prefill_context(model, enc, None, steps, record=True)
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # fixed length
    out = []
    try:
        for spec in presses:
            press = _press(spec, ratio)
            fork = compress_prefilled(full, press, model, enc) if press else full.fork()
            answer(model, tok, fork, enc, 2)  # warm-up
            fork = compress_prefilled(full, press, model, enc) if press else full.fork()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            answer(model, tok, fork, enc, steps)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out.append({"press": spec, "ms_per_step": round((time.perf_counter() - t0) / steps * 1000, 2)})
            print(f"{spec:14s} {out[-1]['ms_per_step']:8.2f} ms/step", flush=True)
    finally:
        model.generation_config.eos_token_id = eos
    base = next((r["ms_per_step"] for r in out if r["press"] == "none"), None)
    for r in out:
        r.update(vs_none=round(r["ms_per_step"] / base, 3) if base else None, rows=rows,
                 context_tokens=int(enc.ctx_mask.sum(-1)[0]), device=str(next(model.parameters()).device))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--rows", type=int, default=8, help="batch rows (samples answered together)")
    ap.add_argument("--context", type=int, default=600, help="context length in tokens (approximately)")
    ap.add_argument("--steps", type=int, default=40, help="decoded tokens timed per press")
    ap.add_argument("--ratio", type=float, default=0.5, help="compression ratio of the eviction presses")
    ap.add_argument("--out", default=None, help="CSV file to write (atomically)")
    args = ap.parse_args(argv)
    model, tok = kvforge.load_model(args.model, device=args.device)
    rows = measure(model, tok, args.presses.split(","), args.rows, args.context, args.steps, args.ratio)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    print(buf.getvalue(), end="")
    if args.out:
        write_text_atomic(args.out, buf.getvalue())


if __name__ == "__main__":
    main()
