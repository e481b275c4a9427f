"""95% intervals of the summary: Wilson against hand-computed values, the bootstrap's determinism and coverage,
and how summary.csv and report.html carry them."""

from __future__ import annotations

import csv
import json
import random

import pytest

from kvforge.eval.intervals import bootstrap_mean, mean_interval, separated, wilson
from kvforge.eval.report import write_report
from kvforge.eval.results import SUMMARY_COLUMNS, summarize, write_summary_csv


@pytest.mark.parametrize("k,n,low,high", [
    # by hand: centre = (p + z²/2n) / (1 + z²/n), half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²), z = 1.96
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 20, 0.0089, 0.2361),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bootstrap_is_seeded():
    xs = [0.1, 0.5, 0.25, 0.9, 0.3, 0.7, 0.0, 0.45]
    assert bootstrap_mean(xs, seed="a") == bootstrap_mean(xs, seed="a")
    assert bootstrap_mean(xs, seed="a") != bootstrap_mean(xs, seed="b")
    lo, hi = bootstrap_mean(xs, seed="a")
    assert lo < sum(xs) / len(xs) < hi
    assert bootstrap_mean([0.4] * 5) == (0.4, 0.4)


def test_bootstrap_covers_the_true_mean_about_95_percent():
    rng = random.Random(0)
    trials, hits = 200, 0
    for t in range(trials):
        xs = [rng.random() for _ in range(30)]  # uniform(0, 1): true mean 0.5
        lo, hi = bootstrap_mean(xs, seed=t, resamples=400)
        hits += lo <= 0.5 <= hi
    assert 0.88 <= hits / trials <= 0.99


def test_mean_interval_picks_wilson_for_binary_scores():
    assert mean_interval([1, 0, 1, 1, 0, 1, 0, 1, 1, 0]) == wilson(6, 10)
    cont = mean_interval([0.5, 1.0, 0.0, 0.25], seed="x")
    assert cont == bootstrap_mean([0.5, 1.0, 0.0, 0.25], seed="x") and cont != wilson(2, 4)
    assert mean_interval([None, float("nan")]) is None


def test_separated():
    assert separated((0.6, 0.9), (0.1, 0.5)) == 1
    assert separated((0.1, 0.5), (0.6, 0.9)) == -1
    assert separated((0.1, 0.6), (0.5, 0.9)) == 0
    assert separated(None, (0.5, 0.9)) == 0


def _records(n: int, scores: dict[str, list[float]]) -> list[dict]:
    return [{"task": "t", "sample_id": f"s{i}", "press": p, "compression_ratio": 0.0 if p == "none" else 0.5,
             "score": s[i], "agreement": None if p == "none" else 1.0, "seconds": 0.1, "kv_bytes": 100}
            for p, s in scores.items() for i in range(n)]


def test_summary_flags_only_separated_intervals(tmp_path):
    n = 24
    recs = _records(n, {"none": [1.0] * n, "weak": [1.0] * 20 + [0.0] * 4, "strong": [1.0] * 4 + [0.0] * 20})
    rows = {r["press"]: r for r in summarize(recs)}
    assert (rows["none"]["ci_low"], rows["none"]["ci_high"]) == pytest.approx(wilson(24, 24), abs=1e-4)
    assert (rows["strong"]["ci_low"], rows["strong"]["ci_high"]) == pytest.approx(wilson(4, 24), abs=1e-4)
    assert rows["strong"]["vs_baseline"] == "lower"  # [0.07, 0.36] vs [0.86, 1]
    assert rows["weak"]["vs_baseline"] is None  # 20/24: [0.64, 0.93] overlaps [0.86, 1]
    assert rows["none"]["vs_baseline"] is None

    with (tmp_path / "results.jsonl").open("w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    write_summary_csv(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        got = {r["press"]: r for r in csv.DictReader(f)}
    assert list(got["strong"]) == SUMMARY_COLUMNS
    assert got["strong"]["vs_baseline"] == "lower" and got["weak"]["vs_baseline"] == ""
    assert float(got["strong"]["ci_low"]) < float(got["strong"]["score"]) < float(got["strong"]["ci_high"])


def test_report_marks_small_cells_and_separated_differences(tmp_path):
    recs = _records(24, {"none": [1.0] * 24, "strong": [0.0] * 24}) + [
        {**r, "task": "u"} for r in _records(5, {"none": [1.0] * 4 + [0.0], "strong": [1.0] + [0.0] * 4})]
    with (tmp_path / "results.jsonl").open("w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    page = write_report(tmp_path).read_text()
    assert page.count("(indicative only)") == 2  # task u: its two cells of 5 samples
    assert page.count('<td class="lower">lower</td>') == 1  # t: 0/24 vs 24/24; u: 1/5 [0.04, 0.62] vs 4/5 [0.38, 0.96]
    assert "benchmarks/accuracy/" in page
