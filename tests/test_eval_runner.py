"""The eval runner: shared prefill == end to end, resume after interrupt, outputs, bad input."""

import csv
import json

import pytest

from kvforge import KVForgeError
from kvforge.eval import runner
from kvforge.eval.runner import run_eval
from kvforge.models import tiny_model

TASKS = ["niah_single_1", "facts_qa"]
PRESSES = ["knorm", "snapkv", "adakv:knorm"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def run(tmp, tiny, tok, **kw):
    args = dict(model_name="tiny-llama", tasks=TASKS, presses=PRESSES, ratios=[0.3, 0.7], length=400,
                samples=2, out=tmp, max_new_tokens=6, model=tiny, tokenizer=tok, progress=False)
    args.update(kw)
    return run_eval(**args)


def records(out):
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return {(r["task"], r["sample_id"], r["press"], r["compression_ratio"]): r for r in rows}


def summary(out, drop=("seconds",)):
    with (out / "summary.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def test_shared_prefill_equals_end_to_end(tmp_path, tiny, smol_tokenizer):
    shared = records(run(tmp_path / "shared", tiny, smol_tokenizer))
    e2e = records(run(tmp_path / "e2e", tiny, smol_tokenizer, shared_prefill=False))
    assert shared.keys() == e2e.keys() and len(shared) == 2 * 2 * (1 + len(PRESSES) * 2)
    for key in shared:
        assert shared[key]["predictions"] == e2e[key]["predictions"], key
        assert shared[key]["kv_bytes"] == e2e[key]["kv_bytes"], key
    compressed = [r for k, r in shared.items() if k[2] != "none"]
    assert any(r["predictions"] != shared[(r["task"], r["sample_id"], "none", 0.0)]["predictions"]
               for r in compressed)  # compression changed some answers: the comparison has teeth


def test_batched_forks_equal_one_at_a_time(tmp_path, tiny, smol_tokenizer):
    one = records(run(tmp_path / "one", tiny, smol_tokenizer))
    many = records(run(tmp_path / "many", tiny, smol_tokenizer, press_batch=4))
    assert one.keys() == many.keys()
    for key in one:
        assert one[key]["predictions"] == many[key]["predictions"], key
        assert one[key]["kv_bytes"] == many[key]["kv_bytes"], key


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_samples_batched_equal_one_at_a_time(tmp_path, tiny, smol_tokenizer, one_thread, cuda_graph):
    """`sample_batch`: samples of a task prefilled and answered as one left-padded batch record the predictions
    and scores of one sample at a time, for prefill, decode-time, quantizing, merging and extra-pass presses,
    tasks whose answer prefix differs per sample (vt) and several questions per context (facts_qa)."""
    presses = ["knorm", "snapkv", "adakv:knorm", "h2o", "quest", "kivi@bits=2", "kvmerger", "kvzip"]
    kw = dict(tasks=["vt", "facts_qa", "niah_single_1"], presses=presses, samples=3, press_batch=4, length=600,
              cuda_graph=cuda_graph)
    one = records(run(tmp_path / "one", tiny, smol_tokenizer, **kw))
    out = run(tmp_path / "many", tiny, smol_tokenizer, sample_batch=3, **kw)
    many = records(out)
    assert one.keys() == many.keys() and len(one) == 3 * 3 * (2 + 7 * 2)  # kivi is ratio-free
    assert {r["sample_batch"] for r in many.values() if r["press"] != "kivi@bits=2"} == {3}
    # kivi: with the samples of equal token counts (no padding among them; see runner), here mostly alone
    from kvforge.eval.tasks import make_samples
    from kvforge.generate import encode

    for task in kw["tasks"]:
        made = make_samples(task, smol_tokenizer, 600, 3, 0)
        enc = encode(tiny, smol_tokenizer, [x.context for x in made], [x.questions for x in made],
                     [x.answer_prefix for x in made], max_new_tokens=6)
        sizes = {x.id: len(sub) for sub in runner.equal_length_groups(made, enc) for x in sub}
        assert all(many[(task, i, "kivi@bits=2", 0.0)]["sample_batch"] == n for i, n in sizes.items())

    assert len({x.answer_prefix for x in make_samples("vt", smol_tokenizer, 600, 3, 0)}) == 3  # one per row
    for key in one:
        assert one[key]["predictions"] == many[key]["predictions"], key
        assert one[key]["scores"] == many[key]["scores"], key
    assert json.loads((out / "run_meta.json").read_text())["args"]["sample_batch"] == 3


def test_quantizers_batch_samples_of_equal_token_counts(tmp_path, tiny, smol_tokenizer, one_thread):
    """Quantizers answer a padded sample batch in sub-groups of equal token counts (no padding, so their token
    groups start where each row's do): fwe's samples all have the same counts, so they answer as one batch, with
    the predictions of one sample at a time, eagerly and in graph mode (GEAR's and KVQuant's codes decoded in the
    captured step)."""
    from kvforge.eval.tasks import make_samples
    from kvforge.generate import encode

    made = make_samples("fwe", smol_tokenizer, 600, 3, 0)
    enc = encode(tiny, smol_tokenizer, [x.context for x in made], [x.questions for x in made],
                 [x.answer_prefix for x in made], max_new_tokens=6)
    assert [len(g) for g in runner.equal_length_groups(made, enc)] == [3] and not runner._padded(enc)
    presses = ["kivi@bits=2", "gear@bits=2", "kvquant@bits=2"]
    for graph in (False, True):
        kw = dict(tasks=["fwe"], presses=presses, samples=3, length=600, cuda_graph=graph)
        one = records(run(tmp_path / f"one{graph}", tiny, smol_tokenizer, **kw))
        many = records(run(tmp_path / f"many{graph}", tiny, smol_tokenizer, sample_batch=3, **kw))
        assert one.keys() == many.keys() and len(one) == 3 * (1 + 3)
        assert {r["sample_batch"] for r in many.values()} == {3}
        for key in one:
            assert one[key]["predictions"] == many[key]["predictions"], key


def test_batches_gather_samples_of_equal_token_counts():
    """With a sample batch, samples are ordered by their token counts before grouping (stably, compatible samples
    together), so a batch holds as few distinct counts as the task allows."""
    from kvforge.eval.tasks.base import Sample

    def s(i, q=1, mnt=8):
        return Sample("a", f"a-{i}", "ctx", ["q"] * q, "", [["a"]] * q, mnt, "string_match_all", {})

    made = [s(0), s(1), s(2), s(3, q=2), s(4), s(5)]
    counts = {"a-0": (10, (3,)), "a-1": (12, (3,)), "a-2": (10, (3,)), "a-3": (10, (3, 3)), "a-4": (12, (3,)),
              "a-5": (10, (4,))}
    ordered = runner.by_token_counts(made, counts)
    assert [x.id for x in ordered] == ["a-0", "a-2", "a-5", "a-1", "a-4", "a-3"]
    assert [[x.id for x in g] for g in runner.sample_groups(ordered, 2)] == [["a-0", "a-2"], ["a-5", "a-1"],
                                                                              ["a-4"], ["a-3"]]


def test_sample_groups_keep_tasks_and_answer_lengths_apart():
    from kvforge.eval.tasks.base import Sample

    def s(task, i, q=1, mnt=8, metric="string_match_all"):
        return Sample(task, f"{task}-{i}", "ctx", ["q"] * q, "", [["a"]] * q, mnt, metric, {})

    samples = [s("a", 0), s("a", 1), s("a", 2), s("a", 3, q=2), s("a", 4, mnt=9), s("b", 5), s("b", 6),
               s("p", 7, metric="ppl"), s("p", 8, metric="ppl")]
    groups = [[x.id for x in g] for g in runner.sample_groups(samples, 2)]
    assert groups == [["a-0", "a-1"], ["a-2"], ["a-3"], ["a-4"], ["b-5", "b-6"], ["p-7"], ["p-8"]]
    assert [len(g) for g in runner.sample_groups(samples, 1)] == [1] * len(samples)


def test_graph_decoded_answers_equal_transformers_decoded(tmp_path, tiny, smol_tokenizer):
    """`cuda_graph=True` (answers decoded by replayed graph steps; on CPU uncaptured), batched forks included,
    records the same predictions as transformers' generate, and the run says which path it took."""
    from unittest.mock import patch

    from kvforge.cache.graphs import GraphDecoder

    plain = records(run(tmp_path / "plain", tiny, smol_tokenizer, press_batch=4))
    with patch.object(GraphDecoder, "step", autospec=True, side_effect=GraphDecoder.step) as spy:
        graph_out = run(tmp_path / "graph", tiny, smol_tokenizer, press_batch=4, cuda_graph=True)
    assert spy.call_count > 0
    graph = records(graph_out)
    assert plain.keys() == graph.keys()
    for key in plain:
        assert plain[key]["predictions"] == graph[key]["predictions"], key
    assert json.loads((graph_out / "run_meta.json").read_text())["args"]["cuda_graph"] is True


def test_perplexity_with_quantizers_shared_equals_end_to_end(tmp_path, tiny, smol_tokenizer):
    """`ppl` (no questions) through the shared prefill with eviction and quantizing presses (a crash once:
    the cache reserve asked for the longest question of none)."""
    kw = dict(tasks=["ppl"], presses=["knorm", "kivi@bits=2@residual_length=32"], ratios=[0.5], samples=1)
    shared = records(run(tmp_path / "shared", tiny, smol_tokenizer, **kw))
    e2e = records(run(tmp_path / "e2e", tiny, smol_tokenizer, shared_prefill=False, **kw))
    assert shared.keys() == e2e.keys() and len(shared) == 3
    ppl = {k[2]: r["score"] for k, r in shared.items()}
    assert all(p > 1 for p in ppl.values()) and ppl["knorm"] != ppl["none"], ppl
    for key in shared:
        assert shared[key]["score"] == pytest.approx(e2e[key]["score"], rel=1e-5), key


def test_outputs_and_resume_after_interrupt(tmp_path, tiny, smol_tokenizer, monkeypatch):
    full = run(tmp_path / "full", tiny, smol_tokenizer)
    for name in ("results.jsonl", "summary.csv", "run_meta.json", "report.html"):
        assert (full / name).exists(), name
    header = (full / "summary.csv").read_text().splitlines()[0]
    assert header == ",".join(runner.SUMMARY_COLUMNS)
    meta = json.loads((full / "run_meta.json").read_text())
    assert {"git_commit", "args", "versions", "device", "started", "ended"} <= meta.keys()
    assert "<img" in (full / "report.html").read_text() and (full / "score_facts_qa.png").exists()

    # interrupt after 7 finished units, then run the same command again
    real_record, calls = runner._record, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real_record(*a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(runner, "_record", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(part, tiny, smol_tokenizer)
    monkeypatch.setattr(runner, "_record", real_record)
    assert len(records(part)) == 7
    with (part / "results.jsonl").open("a") as f:
        f.write('{"task": "niah_single_1", "cut by the kill')  # a half-written line is ignored
    run(part, tiny, smol_tokenizer)
    assert summary(part) == summary(full)
    assert len(records(part)) == len(records(full))


def test_bad_input(tmp_path, tiny, smol_tokenizer):
    with pytest.raises(KVForgeError, match="unknown task 'nope'"):
        run(tmp_path / "a", tiny, smol_tokenizer, tasks=["nope"])
    with pytest.raises(KVForgeError, match="length 5000 is outside the model's window"):
        run(tmp_path / "b", tiny, smol_tokenizer, length=5000)
    with pytest.raises(KVForgeError, match="press list is empty"):
        run(tmp_path / "c", tiny, smol_tokenizer, presses=[])
    with pytest.raises(KVForgeError, match="unknown press 'snap'"):
        run(tmp_path / "d", tiny, smol_tokenizer, presses=["snap"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KVForgeError, match="not writable"):
        run(blocker / "sub", tiny, smol_tokenizer)


SMALL = dict(tasks=["niah_single_1"], presses=["knorm"], ratios=[0.5], samples=1)


def files_of(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_resume_with_other_settings_is_refused_or_starts_clean(tmp_path, tiny, smol_tokenizer):
    """Rows carry the settings that define them; resuming with another setting is refused in one line naming it
    (both values) and leaves the folder as it was; `overwrite=True` starts clean."""
    out = run(tmp_path / "run", tiny, smol_tokenizer, **SMALL)
    rows = list(records(out).values())
    assert len(rows) == 2 and all(r["length"] == 400 and r["max_new_tokens"] == 6 for r in rows)
    settings = rows[0]["settings"]
    assert settings == json.loads((out / "run_meta.json").read_text())["settings"]
    assert {"model", "dtype", "prompt_format", "seed", "max_new_tokens", "query_aware", "cuda_graph"} <= set(settings)
    assert settings["dtype"] == "float32" and settings["prompt_format"].startswith("kvpress: chat template ")
    before = files_of(out)
    for kw, msg in [(dict(max_new_tokens=8), "made with max_new_tokens=6, this one has max_new_tokens=8"),
                    (dict(seed=1), "made with seed=0, this one has seed=1"),
                    (dict(query_aware=True), "made with query_aware=False, this one has query_aware=True")]:
        with pytest.raises(KVForgeError, match=msg + ".*--overwrite") as e:
            run(out, tiny, smol_tokenizer, **{**SMALL, **kw})
        assert "\n" not in str(e.value) and files_of(out) == before
    with pytest.raises(KVForgeError, match="model='tiny-llama', this one has model='smollm2-135m'"):
        run(out, None, None, model_name="smollm2-135m", **SMALL)  # refused before the model loads
    run(out, tiny, smol_tokenizer, max_new_tokens=8, overwrite=True, **SMALL)
    rows = list(records(out).values())
    assert len(rows) == 2 and all(r["settings"]["max_new_tokens"] == 8 for r in rows)
    assert json.loads((out / "run_meta.json").read_text())["settings"]["max_new_tokens"] == 8
    run(out, tiny, smol_tokenizer, max_new_tokens=8, **SMALL)  # the same settings resume: nothing redone
    assert len(records(out)) == 2


def test_a_refused_run_writes_nothing(tmp_path, tiny, smol_tokenizer):
    """Every argument is checked before anything is written: a refused run leaves an existing run's folder
    byte for byte as it was (once, an unknown task rewrote its run_meta.json) and creates no new folder."""
    out = run(tmp_path / "run", tiny, smol_tokenizer, **SMALL)
    before = files_of(out)
    for kw, msg in [(dict(tasks=["nope"]), "unknown task 'nope'"),
                    (dict(length=5000), "length 5000 is outside the model's window"),
                    (dict(length=2040), "exceeds the model's maximum of 2048 tokens"),  # + question + answer
                    (dict(presses=["knorm@budget=4"]), "budget is not a spec option"),
                    (dict(presses=["kivi@bits=2@bits=4"]), "option 'bits' is given twice"),
                    (dict(ratios=[0.5, 1.5]), "ratio 1.5 is outside"),
                    (dict(ratios=[]), "ratio list is empty"),
                    (dict(samples=0), "samples=0; allowed: an integer >= 1"),
                    (dict(max_new_tokens=0), "max_new_tokens=0; allowed: an integer >= 1"),
                    (dict(press_batch=0), "press_batch=0"),
                    (dict(presses=["kvzip"], query_aware=True), "query_aware is not supported")]:
        with pytest.raises(KVForgeError, match=msg) as e:
            run(out, tiny, smol_tokenizer, **{**SMALL, **kw})
        assert "\n" not in str(e.value) and files_of(out) == before, kw
        fresh = tmp_path / "fresh" / "sub"
        with pytest.raises(KVForgeError, match=msg):
            run(fresh, tiny, smol_tokenizer, **{**SMALL, **kw})
        assert not (tmp_path / "fresh").exists(), kw


def test_chunked_prefill_sweep(tmp_path, tiny, smol_tokenizer):
    """`chunk_size`: the baseline answers as unchunked (no press), every press prefills on its own with the ratio
    kept, and the chunk size is a setting of the run."""
    kw = dict(tasks=["facts_qa"], presses=["knorm", "snapkv"], ratios=[0.5], samples=1, length=300)
    plain = records(run(tmp_path / "plain", tiny, smol_tokenizer, **kw))
    chunked = records(run(tmp_path / "chunked", tiny, smol_tokenizer, chunk_size=64, **kw))
    assert plain.keys() == chunked.keys()
    for key in plain:
        if key[2] == "none":
            assert chunked[key]["predictions"] == plain[key]["predictions"]
        else:
            assert chunked[key]["kv_bytes"] == plain[key]["kv_bytes"]  # the same share of the context kept
    meta = json.loads((tmp_path / "chunked" / "run_meta.json").read_text())
    assert meta["settings"]["prefill_chunk"] == 64 and meta["args"]["shared_prefill"] is False
    with pytest.raises(KVForgeError, match="prefill_chunk"):
        run(tmp_path / "chunked", tiny, smol_tokenizer, chunk_size=32, **kw)  # resuming with another chunk size
