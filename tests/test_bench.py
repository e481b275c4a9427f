"""`kvforge bench` on CPU with a tiny model: files written, bytes follow the ratio, layouts, bad input."""

import csv
import json

import pytest

from kvforge import KVForgeError
from kvforge.cli import main
from kvforge.eval.bench import against_none, run_bench
from kvforge.models import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def test_bench_rows_files_and_layouts(tmp_path, tiny):
    rows = run_bench("tiny", None, [96], 2, ["none", "knorm", "adakv:knorm"], [0.5], 4, str(tmp_path),
                     device="cpu", layouts=["packed", "padded"], model=tiny)
    by = {r["press"]: r for r in rows}
    assert set(by) == {"none", "knorm", "adakv:knorm [padded]", "adakv:knorm [packed]"}
    assert by["adakv:knorm [packed]"]["layer_kind"] == "PackedHeadLayer"
    assert by["adakv:knorm [padded]"]["layer_kind"] == "HeadVarlenLayer"
    full = by["none"]["kv_gb"]
    assert by["knorm"]["kv_gb"] == pytest.approx(full / 2, rel=0.1)  # half the entries kept (+ 4 decoded tokens)
    assert by["adakv:knorm [packed]"]["kv_gb"] == pytest.approx(full / 2, rel=0.1)
    for r in rows:
        assert r["decode_ms_per_token"] > 0 and r["batch"] == 2 and r["context"] == 96
    saved = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["press"] for r in saved] == [r["press"] for r in rows]
    with (tmp_path / "bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert by["none"]["speedup_vs_none"] == 1.0 and by["knorm"]["speedup_vs_none"] > 0
    assert by["knorm"].get("memory_freed_of_kv_removed") is None  # no peak counter on CPU
    assert saved[1]["speedup_vs_none"] == by[saved[1]["press"]]["speedup_vs_none"]


def test_against_none_on_constructed_rows():
    """Speed and freed memory relative to the `none` row of the same context and compile variant only."""
    rows = [{"press": "none", "context": 128, "batch": 1, "compiled": True, "decode_ms_per_token": 9.0,
             "kv_gb": 17.0, "decode_peak_gb": 35.0},
            {"press": "knorm", "context": 128, "batch": 1, "compiled": True, "decode_ms_per_token": 6.0,
             "kv_gb": 4.0, "decode_peak_gb": 22.5},
            {"press": "knorm", "context": 128, "batch": 1, "compiled": False, "decode_ms_per_token": 7.0,
             "kv_gb": 4.0, "decode_peak_gb": 22.0},
            {"press": "knorm", "context": 64, "batch": 1, "compiled": True, "decode_ms_per_token": 3.0,
             "kv_gb": 2.0, "decode_peak_gb": 20.0},
            {"press": "knorm", "context": 128, "batch": 1, "compiled": True, "decode_ms_per_token": 6.0,
             "kv_gb": 4.0, "decode_peak_gb": 22.5, "run_started": "another run"}]
    against_none(rows)
    assert rows[0]["speedup_vs_none"] == 1.0 and "memory_freed_of_kv_removed" not in rows[0]
    assert rows[1]["speedup_vs_none"] == 1.5
    assert rows[1]["memory_freed_of_kv_removed"] == pytest.approx(12.5 / 13.0, abs=1e-3)
    assert not any("speedup_vs_none" in r for r in rows[2:])  # no none row of that variant, context or run


def test_bench_compile_both_times_each_row_twice(tmp_path, tiny):
    """`--compile both`: every row without and with torch.compile in the same run (on CPU the compiled step runs
    in graph mode, uncaptured); the kept bytes are the same either way."""
    rows = run_bench("tiny", None, [64], 1, ["none", "knorm"], [0.5], 4, str(tmp_path), device="cpu",
                     model=tiny, compile="both")
    assert [(r["press"], r["compiled"]) for r in rows] == [("none", False), ("none", True), ("knorm", False),
                                                           ("knorm", True)]
    assert all(r["decode_ms_per_token"] > 0 for r in rows)
    assert rows[3]["compression_overhead_s"] is not None
    # the two variants of a row share one prefill and decode on from it: same prefill, 4 more entries
    for plain, compiled in (rows[:2], rows[2:]):
        assert plain["prefill_s"] == compiled["prefill_s"]
        assert compiled["entries_layer"] == plain["entries_layer"] + 4
    assert rows[2]["entries_layer"] < rows[0]["entries_layer"]  # knorm 0.5 kept fewer


def test_bench_bad_input(tmp_path, tiny, capsys):
    with pytest.raises(KVForgeError,
                       match="unknown compile mode 'sometimes'; allowed: auto, off, on, both, autotune, max-autotune"):
        run_bench("tiny", None, [64], 1, ["none"], [0.5], 2, str(tmp_path), model=tiny, compile="sometimes")
    with pytest.raises(KVForgeError, match="unknown layout.*allowed: packed, padded"):
        run_bench("tiny", None, [64], 1, ["adakv:knorm"], [0.5], 2, str(tmp_path), layouts=["ragged"], model=tiny)
    assert main(["bench", "--presses", "none"]) != 0  # neither --model nor --random-weights
    assert "give --model M" in capsys.readouterr().err


def test_bench_resumes_an_interrupted_run(tmp_path, tiny, monkeypatch):
    """A run stopped mid-grid keeps its finished rows; the next run with the same set-up times only what is
    missing (rows kept verbatim, labelled with the run that timed them); another set-up is refused, or with
    `overwrite` starts afresh."""
    import kvforge.eval.bench as bench

    real = bench._press_rows
    calls = []

    def counted(model, ids, spec, *a, **k):
        calls.append(spec)
        if spec == "knorm" and stop:
            raise KeyboardInterrupt
        return real(model, ids, spec, *a, **k)

    monkeypatch.setattr(bench, "_press_rows", counted)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        run_bench("tiny", None, [48], 1, ["none", "knorm"], [0.5], 3, str(tmp_path), device="cpu", model=tiny)
    first = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["press"] for r in first] == ["none"]

    stop, calls[:] = False, []
    rows = run_bench("tiny", None, [48], 1, ["none", "knorm"], [0.5], 3, str(tmp_path), device="cpu", model=tiny)
    assert calls == ["knorm"]  # "none" was not timed again
    assert {k: v for k, v in rows[0].items() if k != "speedup_vs_none"} == {k: v for k, v in first[0].items()
                                                                              if k != "speedup_vs_none"}
    assert [r["press"] for r in rows] == ["none", "knorm"]
    assert rows[1]["speedup_vs_none"] is None  # none was timed by the earlier run: no cross-run ratio
    assert rows[1]["compression_overhead_s"] == pytest.approx(rows[1]["prefill_s"] - rows[0]["prefill_s"], abs=1e-3)
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert len(meta["runs"]) == 2 and rows[1]["run_started"] == meta["runs"][1]["started"]

    calls[:] = []  # another set-up (more new tokens): refused in one line naming it, the folder left as it was
    before = (tmp_path / "bench.json").read_text()
    with pytest.raises(KVForgeError, match="made with new_tokens=3, this one has new_tokens=4.*--overwrite") as e:
        run_bench("tiny", None, [48], 1, ["none", "knorm"], [0.5], 4, str(tmp_path), device="cpu", model=tiny)
    assert "\n" not in str(e.value) and calls == [] and (tmp_path / "bench.json").read_text() == before
    rows = run_bench("tiny", None, [48], 1, ["none", "knorm"], [0.5], 4, str(tmp_path), device="cpu", model=tiny,
                     overwrite=True)  # explicitly: start clean
    assert calls == ["none", "knorm"] and len(rows) == 2 and all(r["new_tokens"] == 4 for r in rows)
    assert len(json.loads((tmp_path / "bench.json").read_text())["meta"]["runs"]) == 1


def test_bench_hf_caches_share_the_columns(tmp_path, tiny, smol_tokenizer, capsys):
    """`kvforge bench --hf-caches dynamic` finishes with its CSV and plot; rows of every cache kind (dense, per-head
    padded and packed, transformers' DynamicCache) have the same columns, and `entries_layer` is the same quantity
    for all of them: entries per (batch row, KV head) of the first full-attention layer."""
    from kvforge.eval.bench import COLUMNS

    model_dir = tmp_path / "tiny"
    tiny.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["bench", "--model", str(model_dir), "--context", "80", "--batch", "2", "--new-tokens", "3",
                 "--presses", "none,knorm,adakv:knorm", "--ratios", "0.5", "--layouts", "packed,padded",
                 "--hf-caches", "dynamic", "--device", "cpu", "--no-cuda-graph", "--out", str(out)]) == 0
    assert "bench.csv" in capsys.readouterr().out
    with (out / "bench.csv").open() as f:
        reader = csv.DictReader(f)
        rows = {r["press"]: r for r in reader}
        assert reader.fieldnames[: len(COLUMNS)] == COLUMNS
    assert set(rows) == {"none", "knorm", "adakv:knorm [padded]", "adakv:knorm [packed]", "transformers:dynamic"}
    assert (out / "bench.png").stat().st_size > 1000
    saved = json.loads((out / "bench.json").read_text())["rows"]
    assert all(set(COLUMNS) <= set(r) for r in saved)
    e = {p: float(r["entries_layer"]) for p, r in rows.items()}
    assert e["transformers:dynamic"] == e["none"] == 80 + 3  # every context token and every decoded one
    assert e["knorm"] == 40 + 3
    assert e["adakv:knorm [padded]"] == pytest.approx(e["knorm"], abs=0.5)  # the same total budget, spread
    assert e["adakv:knorm [packed]"] == pytest.approx(e["knorm"], abs=0.5)
    hf = rows["transformers:dynamic"]
    assert float(hf["kv_gb"]) == float(rows["none"]["kv_gb"]) and float(hf["speedup_vs_none"]) > 0
    assert hf["layer_kind"] == "DynamicCache" and float(hf["attention_ms_per_layer"]) > 0


def test_bench_reports_press_time_and_chunked_rows(tmp_path, tiny):
    """`press_ms` is the time in the press's compress (0 without a press), a share of the prefill; chunked rows are
    compared with the `none` row of the same chunk size."""
    rows = run_bench("tiny", None, [128], 1, ["none", "knorm", "snapkv"], [0.75], 3, str(tmp_path), device="cpu",
                     model=tiny, prefill_chunks=[None, 32])
    by = {(r["press"], r["prefill_chunk"]): r for r in rows}
    assert set(by) == {(p, c) for p in ("none", "knorm", "snapkv") for c in (None, 32)}
    for chunk in (None, 32):
        assert by[("none", chunk)]["press_ms"] == 0.0 and by[("none", chunk)]["press_share"] == 0.0
        for p in ("knorm", "snapkv"):
            r = by[(p, chunk)]
            assert r["press_ms"] > 0 and 0 < r["press_share"] < 1
            assert r["press_ms"] / 1e3 <= r["prefill_s"]
            assert r["compression_overhead_s"] == pytest.approx(r["prefill_s"] - by[("none", chunk)]["prefill_s"],
                                                                abs=1e-3)
            assert r["kv_gb"] == pytest.approx(by[("none", chunk)]["kv_gb"] / 4, rel=0.1)  # a quarter kept
            assert r["speedup_vs_none"] is not None
    with (tmp_path / "bench.csv").open() as f:
        header = next(csv.reader(f))
    assert {"press_ms", "press_share", "prefill_chunk", "prefill_peak_gb"} <= set(header)


def test_bench_refuses_a_press_that_cannot_chunk(tmp_path, tiny):
    with pytest.raises(KVForgeError, match="^observed_attention cannot compress a prefill chunk by chunk"):
        run_bench("tiny", None, [64], 1, ["none", "observed_attention"], [0.5], 2, str(tmp_path / "x"),
                  device="cpu", model=tiny, prefill_chunks=[16])
    assert not (tmp_path / "x").exists()


def test_bench_sharing_rows_next_to_the_dense_model(tmp_path, tiny):
    """`--sharing`: per context a dense eager row and one row per preset; KV bytes follow the producing layers
    (lckv with 2 warm-up layers on 4 layers: 3 of 4 store KV; cla: 2 of 4), speed compared with the eager dense row."""
    rows = run_bench("tiny", None, [48], 1, ["none"], [0.5], 3, str(tmp_path), device="cpu", model=tiny,
                     sharing=["cla", "lckv"])
    by = {r["press"]: r for r in rows}
    assert set(by) == {"none", "none [eager]", "sharing:cla", "sharing:lckv"}
    dense = by["none [eager]"]["kv_gb"]
    assert by["none [eager]"]["kv_gb"] == by["none"]["kv_gb"]
    assert by["sharing:cla"]["kv_gb"] == pytest.approx(dense / 2, rel=1e-6)
    assert by["sharing:lckv"]["kv_gb"] == pytest.approx(dense * 3 / 4, rel=1e-6)
    assert by["sharing:cla"]["kv_layers"] == "0_0_2_2" and by["sharing:cla"]["speedup_vs_dense"] > 0
    assert by["sharing:cla"]["speedup_vs_none"] is None  # eager vs captured would not be a fair ratio
    with pytest.raises(KVForgeError, match="sharing preset 'nope'; allowed: lckv, cla, yoco, mixattention"):
        run_bench("tiny", None, [48], 1, ["none"], [0.5], 3, str(tmp_path / "b"), model=tiny, sharing=["nope"])
    with pytest.raises(KVForgeError, match="sharing needs a Llama-architecture model"):
        run_bench("tiny", None, [48], 1, ["none"], [0.5], 3, str(tmp_path / "c"), model=tiny_model("qwen2"),
                  sharing=["cla"])


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_on_cuda_press_time_comes_from_stream_events_one_pair_per_compressed_layer():
    """On CUDA `compress` is timed by two events per call on the stream (nothing synchronised): one pair per
    compressed layer, a positive span shorter than the prefill; with `press_sync` the host clock counts instead."""
    import time

    import torch

    from kvforge import KVCache
    from kvforge.generate import prefill
    from kvforge.presses.registry import get_press

    model = tiny_model("llama").cuda()
    ids = torch.randint(3, 100, (1, 256), device="cuda")
    for sync in (False, True):
        cache = KVCache(model, press=get_press("knorm", compression_ratio=0.5))
        cache.press_seconds, cache.press_sync = 0.0, sync
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            prefill(model, ids, torch.ones_like(ids), cache)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        assert len(cache.press_events) == (0 if sync else len(cache.compressible_layers()))
        assert 0 < cache.press_time() < total
        assert all(layer.kv()[0].shape[2] == 128 for layer in cache.layers)  # the press did run
