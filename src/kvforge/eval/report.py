"""`report.html`: one self-contained page (plots embedded) plus the same plots as PNG files."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvforge.eval.intervals import INDICATIVE_BELOW  # noqa: E402
from kvforge.eval.results import BASELINE, SUMMARY_COLUMNS, read_results, summarize  # noqa: E402
from kvforge.eval.runs import write_text_atomic  # noqa: E402


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return base64.b64encode(data).decode()


def score_curves(rows: list[dict], out_dir: Path) -> list[tuple[str, str, str]]:
    """One plot per task: score versus compression ratio, a line per press, the baseline dashed."""
    plots = []
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    for task, rs in sorted(by_task.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        presses = sorted({r["press"] for r in rs if r["press"] != BASELINE})
        colors = plt.cm.tab10.colors if len(presses) <= 10 else plt.cm.tab20.colors
        markers = "osD^vP*Xh<>p"
        ratios = [r["compression_ratio"] for r in rs]
        step = 0.012 * ((max(ratios) - min(ratios)) or 1.0)  # presses side by side, so error bars don't overlap
        for i, p in enumerate(presses):
            dx = (i - (len(presses) - 1) / 2) * step if len(presses) <= 8 else 0.0
            pts = sorted((r["compression_ratio"], r["score"], _err(r)) for r in rs
                         if r["press"] == p and r["score"] is not None)
            if pts:
                ax.errorbar([x + dx for x, _, _ in pts], [y for _, y, _ in pts],
                            yerr=[[e[0] for _, _, e in pts], [e[1] for _, _, e in pts]], capsize=3,
                            marker=markers[i % len(markers)], color=colors[i % len(colors)], label=p, alpha=0.85)
        base = [r for r in rs if r["press"] == BASELINE and r["score"] is not None]
        if base:
            ax.axhline(base[0]["score"], color="black", linestyle="--", linewidth=1, label="uncompressed")
            if base[0].get("ci_low") is not None:
                ax.axhspan(base[0]["ci_low"], base[0]["ci_high"], color="black", alpha=0.08,
                           label="uncompressed 95% CI")
        ppl = any(r.get("metric") == "ppl" for r in rs)
        ax.set_xlabel("compression ratio (fraction of context KV removed)")
        ax.set_ylabel(("perplexity (lower is better)" if ppl else "score") + ", bars: 95% CI")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        name = f"score_{task}.png"
        plots.append((f"{task}: score versus compression ratio", name, _save(fig, out_dir / name)))
    return plots


def _err(row: dict) -> tuple[float, float]:
    """The row's 95% interval as error-bar lengths below and above its score (0, 0 without one)."""
    if row.get("ci_low") is None:
        return 0.0, 0.0
    return max(row["score"] - row["ci_low"], 0.0), max(row["ci_high"] - row["score"], 0.0)


def _cell(row: dict, col: str) -> str:
    """One summary cell as HTML: n < INDICATIVE_BELOW marked "indicative only", a baseline difference flagged."""
    value = "" if row[col] is None else html.escape(str(row[col]))
    if col == "n" and row["n"] < INDICATIVE_BELOW:
        return f'<td class="few" title="fewer than {INDICATIVE_BELOW} samples">{value} (indicative only)</td>'
    if col == "vs_baseline" and row[col]:
        return f'<td class="{html.escape(row[col])}">{value}</td>'
    return f"<td>{value}</td>"


def accuracy_link(out_dir: Path) -> str:
    """Where the GPU accuracy tables live: `benchmarks/accuracy/` of the kvforge repository, linked relative to
    the report when this is a source checkout."""
    target = Path(__file__).resolve().parents[3] / "benchmarks" / "accuracy"
    if not (target.parent.is_dir() and (target.parents[1] / "pyproject.toml").exists()):
        return "<code>benchmarks/accuracy/</code> in the kvforge repository"
    href = os.path.relpath(target / "README.md", out_dir.resolve())
    return f'<a href="{html.escape(href)}"><code>benchmarks/accuracy/</code></a> in the kvforge repository'


def needle_heatmaps(records: list[dict], out_dir: Path) -> list[tuple[str, str, str]]:
    """Needle grid: depth × length of the mean score, for the baseline and each press at its largest ratio."""
    needle = [r for r in records if r["task"] == "needle" and "depth" in r.get("meta", {})]
    if not needle:
        return []
    top = defaultdict(float)
    for r in needle:
        top[r["press"]] = max(top[r["press"]], r["compression_ratio"])
    panels = [p for p in sorted(top, key=lambda p: (p != BASELINE, p))]
    lengths = sorted({r["meta"].get("length") for r in needle})
    depths = sorted({r["meta"]["depth"] for r in needle})
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1, 3.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        cells = defaultdict(list)
        for r in needle:
            if r["press"] == p and r["compression_ratio"] == top[p]:
                cells[(r["meta"]["depth"], r["meta"].get("length"))].append(r["score"])
        for (d, n), v in cells.items():
            grid[depths.index(d)][lengths.index(n)] = sum(v) / len(v)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_title(p if p == BASELINE else f"{p} @ {top[p]}", fontsize=8)
        ax.set_xlabel("length", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return [("needle: score by depth and length", "needle_heatmap.png", _save(fig, out_dir / "needle_heatmap.png"))]


def write_report(out_dir: str | Path) -> Path:
    """(Re)build `report.html` and the PNGs from `results.jsonl`."""
    out_dir = Path(out_dir)
    records = read_results(out_dir)
    rows = summarize(records)
    meta_path = out_dir / "run_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    plots = score_curves(rows, out_dir) + needle_heatmaps(records, out_dir)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in SUMMARY_COLUMNS)
    body = "".join("<tr>" + "".join(_cell(r, c) for c in SUMMARY_COLUMNS) + "</tr>" for r in rows)
    figs = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(t)} '
        f"({html.escape(name)})</figcaption></figure>"
        for t, name, b64 in plots
    )
    args = html.escape(json.dumps(meta.get("args", {})))
    m = {k: html.escape(str(meta.get(k, "?"))) for k in ("device", "git_commit", "started", "ended", "prompt_format")}
    model = html.escape(str(meta.get("args", {}).get("model", "?")))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>kvforge report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}
img{{max-width:560px}}code{{font-size:12px}}td.few{{color:#888;font-style:italic}}
td.lower{{background:#f8d0d0}}td.higher{{background:#d0f0d0}}</style></head><body>
<h1>kvforge evaluation</h1>
<p>Model <b>{model}</b> on {m["device"]}; commit <code>{m["git_commit"]}</code>; started {m["started"]},
ended {m["ended"]}. Prompt format: {m["prompt_format"]}.</p>
<p>Arguments: <code>{args}</code></p>
<p>compression_ratio = fraction of context KV entries removed; <i>agreement</i> = token F1 between each answer and
the uncompressed answer of the same run; <i>baseline_score</i> = uncompressed score on the same samples.
<i>ci_low</i>, <i>ci_high</i> = 95% interval of the score (Wilson for 0/1 scores, seeded bootstrap otherwise; the error
bars of the plots); <i>vs_baseline</i> says "lower" or "higher" only when that interval and the uncompressed one on the
same samples do not overlap. Cells of fewer than {INDICATIVE_BELOW} samples are indicative only.</p>
<p>The full method table (both embedded models on a GPU, 7 tasks at 4k tokens, n = 100 per cell):
{accuracy_link(out_dir)}.</p>
<h2>Plots</h2>{figs}
<h2>Summary</h2><table><tr>{head}</tr>{body}</table>
</body></html>"""
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    return path
