"""Merge per-task `kvforge eval` runs into one run per model, and draw the "which press" table from it.

    python benchmarks/accuracy_table.py merge --out benchmarks/accuracy/smollm2-135m runs/gpu/acc_smollm2-135m_*
    python benchmarks/accuracy_table.py best benchmarks/accuracy/smollm2-135m benchmarks/accuracy/gemma3-270m \
        --out benchmarks/accuracy/which_press.csv

`merge`: the GPU table runs one `kvforge eval` process per (model, task) — and a second one per task for the presses
answered one at a time — so that small models keep the GPU busy. This concatenates their `results.jsonl` (a record
present in several runs is kept once; the uncompressed baseline of a sample is the same in every run of its task),
writes `run_meta.json` (each part's command, device, start, end and wall time, the total, and the throughput in
sample × press runs per minute of wall time), then `summary.csv` and `report.html` as `kvforge eval` does. The merged
records are kept as `results.jsonl.gz` (a table's raw JSONL is ~40 MB, gzipped ~1.5 MB); a part may itself be a
merged directory, so presses run later (the decode-time ones, say) are merged into a committed table.

`best`: per model and ratio, every press's score pooled over all tasks (the mean of per-sample scores, each task
weighted by its samples) with a seeded bootstrap 95% interval, the best press, and the presses whose interval overlaps
the best one's (statistically tied). Presses not run on every task of the baseline are left out with a note: a mean
over fewer tasks is not comparable. Written as CSV and printed as the README's Markdown table (to the
character: tests/test_accuracy_table.py compares them).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from kvforge.eval.intervals import mean_interval
from kvforge.eval.results import BASELINE, load_done
from kvforge.eval.runner import write_summary
from kvforge.eval.runs import write_text_atomic


def load_records(run: Path) -> dict[tuple, dict]:
    """A run's records by (task, sample_id, press, ratio): from `results.jsonl`, else `results.jsonl.gz`."""
    plain, packed = run / "results.jsonl", run / "results.jsonl.gz"
    if plain.is_file():
        return load_done(plain)
    if not packed.is_file():
        raise SystemExit(f"{run}: no results.jsonl or results.jsonl.gz; pass kvforge eval output directories")
    try:
        lines = gzip.decompress(packed.read_bytes()).decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SystemExit(f"{packed}: unreadable ({e}); restore it from git") from None
    records = {}
    for line in lines:
        r = json.loads(line)
        records[(r["task"], r["sample_id"], r["press"], r["compression_ratio"])] = r
    return records


def _part_metas(part: Path) -> list[dict]:
    """A part's run_meta as one entry, or a merged directory's own parts."""
    meta_path = part / "run_meta.json"
    if not meta_path.is_file():
        return []
    meta = json.loads(meta_path.read_text())
    if "parts" in meta:
        return [{**m, "dir": m.get("dir")} for m in meta["parts"]]
    return [{"dir": part.name, **meta}]


def unfinished(part: Path) -> bool:
    """True for a `kvforge eval` run that was stopped: its run_meta.json has no `ended` (a merged table has one)."""
    meta_path = part / "run_meta.json"
    return meta_path.is_file() and not json.loads(meta_path.read_text()).get("ended")


def merge(parts: list[Path], out: Path, partial: bool = False) -> dict:
    """Concatenate the parts' results into `out` and write its meta, summary and report (each file atomically).
    A part whose run was stopped (cells with fewer samples than asked) is refused unless `partial`."""
    stopped = [str(p) for p in parts if unfinished(p)]
    if stopped and not partial:
        raise SystemExit(f"unfinished runs (no 'ended' in run_meta.json): {', '.join(stopped)}; resume them, leave "
                         "them out, or pass --partial")
    records: dict[tuple, dict] = {}
    metas = []
    for part in parts:
        for key, rec in load_records(part).items():
            records.setdefault(key, rec)
        metas += _part_metas(part)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records.values()))
    runs = sum(1 for r in records.values() if r["press"] != BASELINE)
    walls = [m.get("wall_seconds") for m in metas if m.get("wall_seconds")]
    starts = sorted(m["started"] for m in metas if m.get("started"))
    ends = sorted(m["ended"] for m in metas if m.get("ended"))
    meta = {
        "merged_from": [m["dir"] for m in metas],
        "parts": [{k: m.get(k) for k in ("dir", "argv", "device", "started", "ended", "wall_seconds", "settings",
                                          "git_commit", "versions", "prompt_format")} for m in metas],
        "device": sorted({m.get("device") for m in metas if m.get("device")}),
        "started": starts[0] if starts else None,
        "ended": ends[-1] if ends else None,
        "samples": len({(r["task"], r["sample_id"]) for r in records.values()}),
        "press_runs": runs,
        "sum_of_part_wall_seconds": round(sum(walls), 1),
        "note": "parts ran concurrently on one GPU; the wall time of the whole table is ended - started",
    }
    write_text_atomic(out / "run_meta.json", json.dumps(meta, indent=2))
    write_summary(out)
    tmp = out / "results.jsonl.gz.tmp"
    tmp.write_bytes(gzip.compress((out / "results.jsonl").read_bytes(), mtime=0))
    os.replace(tmp, out / "results.jsonl.gz")
    (out / "results.jsonl").unlink()
    return meta


def best(run_dirs: list[Path]) -> list[dict]:
    """Rows (model, ratio, press, n, score, ci_low, ci_high, best, tied_with_best) pooled over tasks."""
    rows = []
    for run in run_dirs:
        recs = list(load_records(run).values())
        meta = json.loads((run / "run_meta.json").read_text()) if (run / "run_meta.json").is_file() else {}
        model = (meta.get("parts") or [{}])[0].get("settings", {}).get("model") or run.name
        cells: dict[tuple, list[float]] = defaultdict(list)
        tasks: dict[tuple, set] = defaultdict(set)
        for r in recs:
            cells[(r["compression_ratio"], r["press"])].append(r["score"])
            tasks[(r["compression_ratio"], r["press"])].add(r["task"])
        every = tasks.get((0.0, BASELINE), set())
        partial = sorted({p for (_, p), ts in tasks.items() if ts != every})
        if partial:  # a pooled score over fewer tasks is not comparable with one over all of them
            print(f"{model}: left out of the pooled table, not run on every task: {', '.join(partial)}",
                  file=sys.stderr)
            cells = {k: v for k, v in cells.items() if k[1] not in partial}
        base = cells.get((0.0, BASELINE), [])
        base_ci = mean_interval(base, seed=f"{model}|none") if base else None
        by_ratio: dict[float, list[dict]] = defaultdict(list)
        for (ratio, press), scores in cells.items():
            if press == BASELINE:
                continue
            ci = mean_interval(scores, seed=f"{model}|{press}|{ratio}")
            by_ratio[ratio].append({"model": model, "compression_ratio": ratio, "press": press, "n": len(scores),
                                    "score": round(sum(scores) / len(scores), 4),
                                    "ci_low": round(ci[0], 4), "ci_high": round(ci[1], 4),
                                    "baseline": round(sum(base) / len(base), 4) if base else None,
                                    "baseline_ci": None if base_ci is None else
                                    f"{base_ci[0]:.3f}-{base_ci[1]:.3f}"})
        for _ratio, cand in sorted(by_ratio.items()):
            cand.sort(key=lambda c: -c["score"])
            top = cand[0]
            for c in cand:
                c["best"] = c is top
                c["tied_with_best"] = c["ci_high"] >= top["ci_low"]
            rows.extend(cand)
    return rows


def markdown(rows: list[dict]) -> str:
    """The README's "which press" table: per model and ratio the best press with its interval, the presses tied
    with it, and the best press not tied with it (`next`); the model cell carries the uncompressed score."""
    out = ["| model (uncompressed) | ratio | best press | tied with it | next |", "|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["compression_ratio"])].append(r)
    shown = set()
    for (model, ratio), rs in groups.items():
        rs = sorted(rs, key=lambda r: -r["score"])
        top = next(r for r in rs if r["best"])
        tied = [r["press"] for r in rs if r["tied_with_best"] and not r["best"]]
        after = next((r for r in rs if not r["tied_with_best"]), None)
        base = top["baseline"]
        first = "" if model in shown else (
            f"{model} ({base:.3f}, {top['baseline_ci'].replace('-', '–')})" if base is not None else model)
        shown.add(model)
        label = "quantization (no ratio)" if ratio == 0.0 else f"{ratio:g}"
        nxt = "—" if after is None else f"{after['press']} {after['score']:.3f}"
        ci = f"({top['ci_low']:.3f}–{top['ci_high']:.3f})"
        out.append(f"| {first} | {label} | {top['press']} {top['score']:.3f} {ci} | {', '.join(tied) or '—'} | {nxt} |")
    return "\n".join(out)


def load_best(path: Path) -> list[dict]:
    """Rows of a `best` CSV (`which_press.csv`) with their types, as `best` returns them."""
    types = {"compression_ratio": float, "n": int, "score": float, "ci_low": float, "ci_high": float,
             "baseline": float, "best": lambda v: v == "True", "tied_with_best": lambda v: v == "True"}
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: (types[k](v) if k in types and v != "" else (None if v == "" else v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("parts", nargs="+", type=Path)
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--partial", action="store_true", help="merge stopped runs too (their cells hold fewer samples)")
    b = sub.add_parser("best")
    b.add_argument("runs", nargs="+", type=Path)
    b.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "merge":
        meta = merge(args.parts, args.out, partial=args.partial)
        print(f"{args.out}: {meta['samples']} samples, {meta['press_runs']} press runs from {len(meta['parts'])} parts")
    else:
        rows = best(args.runs)
        cols = list(rows[0]) if rows else []
        lines = [",".join(cols)] + [",".join("" if r[c] is None else str(r[c]) for c in cols) for r in rows]
        write_text_atomic(args.out, "\n".join(lines) + "\n")
        print(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
