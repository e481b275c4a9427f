"""`kvforge demo`: a sweep sized for a signal (n >= 20 per cell, few presses, one query-aware), with intervals."""

from __future__ import annotations

import csv
import json

from kvforge.eval import demo
from kvforge.presses.registry import PRESSES, get_press


def test_demo_sweep_is_sized_for_intervals():
    assert all(n >= 20 for n in demo.DEMO_TASKS.values())
    assert 2 <= len(demo.DEMO_PRESSES) <= 4
    assert any(get_press(p, compression_ratio=0.5).acts_while_decoding for p in demo.DEMO_PRESSES)  # query-aware
    assert all(p in PRESSES for p in demo.DEMO_PRESSES)


def test_demo_runs_and_reports_intervals(tmp_path, monkeypatch, smol, capsys):
    monkeypatch.setattr(demo, "DEMO_LENGTH", 300)
    out = tmp_path / "demo"
    demo.run_demo(str(out), samples=2)
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    cells = {(r["press"], float(r["compression_ratio"])) for r in rows}
    assert cells == {("none", 0.0)} | {(p, r) for p in demo.DEMO_PRESSES for r in demo.DEMO_RATIOS}
    assert all(r["n"] == "2" and float(r["ci_low"]) <= float(r["score"]) <= float(r["ci_high"]) for r in rows)
    page = (out / "report.html").read_text()
    assert page.count("(indicative only)") == len(rows)  # n = 2 < 20 everywhere
    assert "benchmarks/accuracy/" in page
    assert json.loads((out / "run_meta.json").read_text())["prompt_format"].startswith("kvpress: ")
    assert "ci_low" in capsys.readouterr().out
