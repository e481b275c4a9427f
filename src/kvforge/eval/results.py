"""A run's records (`results.jsonl`) and their summary (`summary.csv`, a text table)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from kvforge.eval.intervals import mean_interval, separated
from kvforge.eval.runs import write_csv_atomic

SUMMARY_COLUMNS = ["task", "press", "compression_ratio", "n", "score", "ci_low", "ci_high", "baseline_score",
                   "vs_baseline", "agreement", "kv_fraction", "seconds"]
BASELINE = "none"


def load_done(results: Path) -> dict[tuple, dict]:
    done = {}
    if results.exists():
        with results.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interrupt: that unit is simply redone
                    continue
                done[(r["task"], r["sample_id"], r["press"], r["compression_ratio"])] = r
    return done


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> list[dict]:
    """One row per (task, press, ratio): mean score and its 95% interval (`ci_low`, `ci_high`: Wilson when every
    sample scored 0 or 1, else a bootstrap seeded by the cell), the baseline's mean score on the same samples,
    `vs_baseline` ("higher"/"lower" only when the row's interval and the baseline's interval on the same samples
    do not overlap, else empty), mean agreement with the baseline's answers, KV bytes stored as a fraction of the
    baseline's on the same samples (packed bytes for quantizers), total seconds."""
    base = {(r["task"], r["sample_id"]): r["score"] for r in records if r["press"] == BASELINE}
    base_bytes = {(r["task"], r["sample_id"]): r.get("kv_bytes") for r in records if r["press"] == BASELINE}

    def fraction(r):
        full = base_bytes.get((r["task"], r["sample_id"]))
        return None if not full or r.get("kv_bytes") is None else r["kv_bytes"] / full

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["press"], r["compression_ratio"])].append(r)
    rows = []
    for (task, press, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != BASELINE,
                                                                            kv[0][1], kv[0][2])):
        ci = mean_interval([r["score"] for r in rs], seed=f"{task}|{press}|{ratio}")
        base_scores = [base.get((task, r["sample_id"])) for r in rs]
        base_ci = mean_interval(base_scores, seed=f"{task}|{BASELINE}|0.0")
        side = 0 if press == BASELINE else separated(ci, base_ci)
        rows.append({
            "task": task, "press": press, "compression_ratio": ratio, "n": len(rs),
            "score": _round(_mean(r["score"] for r in rs)),
            "ci_low": None if ci is None else _round(ci[0]), "ci_high": None if ci is None else _round(ci[1]),
            "baseline_score": _round(_mean(base_scores)),
            "vs_baseline": {1: "higher", -1: "lower", 0: None}[side],
            "agreement": _round(_mean(r["agreement"] for r in rs)),
            "kv_fraction": _round(_mean(fraction(r) for r in rs)),
            "seconds": round(sum(r["seconds"] for r in rs), 2),
        })
    return rows


def _round(x):
    return None if x is None else round(x, 4)


def read_results(out_dir: str | os.PathLike) -> list[dict]:
    return list(load_done(Path(out_dir) / "results.jsonl").values())


def write_summary_csv(out_dir: str | os.PathLike) -> list[dict]:
    """Write `summary.csv` from `results.jsonl`; returns the summary rows."""
    out_dir = Path(out_dir)
    rows = summarize(read_results(out_dir))
    write_csv_atomic(out_dir / "summary.csv", [{k: ("" if r[k] is None else r[k]) for k in SUMMARY_COLUMNS}
                                               for r in rows], SUMMARY_COLUMNS)
    return rows


def format_table(rows: list[dict]) -> str:
    """The summary as an aligned text table."""
    cols = SUMMARY_COLUMNS
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
