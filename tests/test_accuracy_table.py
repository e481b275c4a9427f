"""benchmarks/accuracy_table.py: merging per-task eval runs into the published table, and the "which press" table.

The merged records are what the README's table is drawn from, so the tool is tested on runs whose answers are
known: every record kept once, gzipped, a committed table merged with later parts, and presses that did not run
on every task left out of the pooled comparison."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("accuracy_table", ROOT / "benchmarks" / "accuracy_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def record(task: str, i: int, press: str, ratio: float, score: float) -> dict:
    return {"task": task, "sample_id": f"{task}-{i}", "press": press, "compression_ratio": ratio,
            "metric": "string_match_all", "questions": ["q"], "predictions": [str(score)], "golds": [["1.0"]],
            "scores": [score], "score": score, "agreement": None, "seconds": 0.1, "prefill_seconds": 0.0,
            "meta": {"length": 100}, "kv_bytes": 1000 if press == "none" else 500, "sample_batch": 1,
            "length": 100, "max_new_tokens": 8, "settings": {"model": "m", "prompt_format": "kvpress"}}


def part(root: Path, name: str, records: list[dict]) -> Path:
    d = root / name
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "run_meta.json").write_text(json.dumps({"argv": ["eval", name], "device": "cpu", "wall_seconds": 1.0,
                                                 "started": "2026-12-06T20:00:00+00:00",
                                                 "ended": "2026-12-06T20:01:00+00:00", "settings": {"model": "m"}}))
    return d


def test_merge_keeps_every_record_once_gzipped_and_accepts_a_merged_table(table, tmp_path, capsys):
    scores = {"none": 1.0, "knorm": 0.0, "h2o": 1.0}
    a = part(tmp_path, "a", [record("A", i, p, r, scores[p]) for i in range(4)
                             for p, r in (("none", 0.0), ("knorm", 0.5))])
    b = part(tmp_path, "b", [record("B", i, p, r, scores[p]) for i in range(4)
                             for p, r in (("none", 0.0), ("knorm", 0.5))])
    dec = part(tmp_path, "dec", [record("A", i, "h2o", 0.5, 1.0) for i in range(4)]
               + [record("A", 0, "none", 0.0, 1.0)])  # a baseline present in two parts is kept once
    out = tmp_path / "table"
    meta = table.merge([a, b, dec], out)
    assert meta["press_runs"] == 4 + 4 + 4 and meta["samples"] == 8
    assert [p["dir"] for p in meta["parts"]] == ["a", "b", "dec"]
    assert (out / "results.jsonl.gz").is_file() and not (out / "results.jsonl").exists()
    assert (out / "summary.csv").is_file() and (out / "report.html").is_file()
    recs = table.load_records(out)
    assert len(recs) == 8 + 8 + 4
    summary = (out / "summary.csv").read_text().splitlines()
    assert any(line.startswith("A,h2o,0.5,4,") for line in summary)
    assert any(line.startswith("B,knorm,0.5,4,0.0,") for line in summary)

    # the decode-time press ran on task A only: left out of the pooled table, with a note
    rows = table.best([out])
    assert {r["press"] for r in rows} == {"knorm"}
    assert "not run on every task: h2o" in capsys.readouterr().err

    # later parts merge into the committed (gzipped) table; its parts' metas are carried over
    dec_b = part(tmp_path, "dec_b", [record("B", i, "h2o", 0.5, 1.0) for i in range(4)])
    meta = table.merge([out, dec_b], out)
    assert meta["press_runs"] == 16 and [p["dir"] for p in meta["parts"]] == ["a", "b", "dec", "dec_b"]
    assert len(gzip.decompress((out / "results.jsonl.gz").read_bytes()).splitlines()) == 8 + 8 + 4 + 4
    rows = table.best([out])
    top = [r for r in rows if r["best"]]
    assert [r["press"] for r in top] == ["h2o"] and top[0]["n"] == 8 and top[0]["score"] == 1.0
    knorm = next(r for r in rows if r["press"] == "knorm")
    assert knorm["score"] == 0.0 and not knorm["tied_with_best"] and knorm["baseline"] == 1.0


def test_merge_refuses_a_folder_without_results(table, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no results.jsonl"):
        table.merge([tmp_path / "empty"], tmp_path / "out")


def test_readme_which_press_table_is_drawn_from_the_committed_run(table):
    """The README's table is `markdown(best)` of the committed `which_press.csv`, to the character: rerunning the
    GPU table and `best` without updating the README fails here."""
    rows = table.load_best(ROOT / "benchmarks" / "accuracy" / "which_press.csv")
    assert {r["model"] for r in rows} == {"smollm2-135m", "gemma3-270m"} and all(r["n"] >= 700 for r in rows)
    assert table.markdown(rows) in (ROOT / "README.md").read_text(encoding="utf-8")


def test_merge_refuses_a_stopped_run_unless_partial(table, tmp_path):
    """A run stopped mid-way (no `ended` in its run_meta.json) holds cells with fewer samples than asked: merging it
    into the published table needs --partial."""
    done = part(tmp_path, "done", [record("A", i, "none", 0.0, 1.0) for i in range(2)])
    stopped = part(tmp_path, "stopped", [record("A", 0, "knorm", 0.5, 1.0)])
    meta = json.loads((stopped / "run_meta.json").read_text())
    del meta["ended"]
    (stopped / "run_meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="unfinished runs .*stopped"):
        table.main(["merge", str(done), str(stopped), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    table.main(["merge", str(done), str(stopped), "--out", str(tmp_path / "out"), "--partial"])
    assert len(table.load_records(tmp_path / "out")) == 3
