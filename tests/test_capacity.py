"""`kvforge bench --max-context / --max-batch`: the search against its slow twin, and on CPU under a memory limit."""

import json

import pytest

from kvforge import KVForgeError, get_press
from kvforge.eval.capacity import fits, largest_fitting, largest_fitting_linear, run_capacity
from kvforge.models import tiny_model


@pytest.mark.parametrize("step", [1, 3, 64])
@pytest.mark.parametrize("start", [1, 5, 256])
def test_search_equals_the_linear_scan(step, start):
    limit = 1000
    for threshold in list(range(0, 40)) + [63, 64, 65, 127, 128, 500, 999, 1000, 5000]:
        calls = []

        def ok(n, t=threshold, calls=calls):
            calls.append(n)
            return n <= t

        got = largest_fitting(ok, start, limit, step)
        assert got == largest_fitting_linear(lambda n, t=threshold: n <= t, limit, step), (threshold, got)
        assert got % step == 0 and got <= limit
        assert all(n <= limit for n in calls)
        assert len(calls) <= 2 * (limit // step).bit_length() + 2  # logarithmic, not a scan


def test_search_with_nothing_fitting_and_everything_fitting():
    assert largest_fitting(lambda n: False, 8, 100, 4) == 0
    assert largest_fitting(lambda n: True, 8, 100, 4) == 100
    assert largest_fitting(lambda n: True, 500, 100, 1) == 100  # a start beyond the limit tries the limit range


@pytest.fixture(scope="module")
def small():
    return tiny_model("llama", vocab_size=512)


def test_chunked_compressed_prefill_fits_longer_contexts_under_a_memory_limit(tmp_path, small):
    """Under a limit between what `none` needs at 256 and at 768 tokens, `none` stops below 768 while knorm 0.75
    prefilled in chunks of 128 reaches the search's limit: its peak is the kept KV plus one chunk."""
    _, at256 = fits(small, None, 1, 256, None)
    _, at768 = fits(small, None, 1, 768, None)
    _, chunked = fits(small, get_press("knorm", compression_ratio=0.75), 1, 1024, 128)
    assert chunked < (at256 + at768) / 2  # the chunked, compressed prefill of 1024 needs less than none at ~512
    limit_gb = (at256 + at768) / 2 / 1e9
    rows = run_capacity(small, ["knorm"], [0.75], str(tmp_path), prefill_chunks=[None, 128], step=128, limit=1024,
                        memory_limit_gb=limit_gb)
    by = {(r["press"], r["prefill_chunk"]): r for r in rows}
    assert set(by) == {("none", None), ("knorm", None), ("none", 128), ("knorm", 128)}
    none = by[("none", None)]["max_context"]
    assert 256 <= none < 768
    assert by[("knorm", 128)]["max_context"] == 1024
    assert by[("knorm", None)]["max_context"] >= none
    for r in rows:
        assert r["peak_gb_at_max"] is None or r["peak_gb_at_max"] <= limit_gb + 1e-3
    ok, _ = fits(small, None, 1, none + 128, None, int(limit_gb * 1e9))
    assert not ok  # the next step up does not fit: the search stopped at the boundary
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert saved["what"] == "context" and len(saved["rows"]) == 4
    assert (tmp_path / "capacity.csv").read_text().startswith("press,compression_ratio,prefill_chunk")


def test_largest_batch_at_a_context(tmp_path, small):
    _, one = fits(small, None, 1, 256, None)
    _, two = fits(small, None, 2, 256, None)
    limit_gb = (one + 3 * (two - one)) / 1e9  # room for about 4 rows of none
    rows = run_capacity(small, ["knorm"], [0.75], str(tmp_path), what="batch", contexts=[256], limit=8,
                        memory_limit_gb=limit_gb)
    by = {r["press"]: r for r in rows}
    assert 2 <= by["none"]["max_batch"] <= 6
    assert by["knorm"]["max_batch"] >= by["none"]["max_batch"]


def test_largest_batch_of_sharing_models_next_to_the_dense_one(tmp_path, small):
    """`sharing`: each preset searched with a random-weight sharing model of the same shapes (its own rows, its
    layer map). On a tiny CPU model the prefill's transient attention matrices, not the KV, set the peak, so how
    the batches compare is for the GPU; here the search must run and stop inside the limit."""
    _, one = fits(small, None, 1, 256, None)
    _, two = fits(small, None, 2, 256, None)
    rows = run_capacity(small, ["none"], [0.5], str(tmp_path), what="batch", contexts=[256], limit=8,
                        memory_limit_gb=(one + 3 * (two - one)) / 1e9, sharing=["cla", "lckv"])
    by = {r["press"]: r for r in rows}
    assert set(by) == {"none", "sharing:cla", "sharing:lckv"}
    assert by["sharing:cla"]["kv_layers"] == "0_0_2_2" and by["none"]["kv_layers"] == "dense"
    for name in ("sharing:cla", "sharing:lckv"):
        assert 1 <= by[name]["max_batch"] < 8 and by[name]["tries"] >= 2 and by[name]["peak_gb_at_max"] > 0
    with pytest.raises(KVForgeError, match="sharing preset 'nope'"):
        run_capacity(small, ["none"], [0.5], str(tmp_path), what="batch", contexts=[256], sharing=["nope"])


def test_capacity_bad_input(tmp_path, small):
    with pytest.raises(KVForgeError, match="memory_limit_gb=0; allowed: a number of GB > 0"):
        run_capacity(small, ["knorm"], [0.5], str(tmp_path), memory_limit_gb=0)
    with pytest.raises(KVForgeError, match="kvzip cannot compress a prefill chunk by chunk"):
        run_capacity(small, ["kvzip"], [0.5], str(tmp_path), prefill_chunks=[64])
    with pytest.raises(KVForgeError, match="a batch search needs the context length"):
        run_capacity(small, ["knorm"], [0.5], str(tmp_path), what="batch")


def test_an_interrupted_search_resumes_from_the_rows_it_found(tmp_path, small, monkeypatch):
    """Rows are appended to capacity.jsonl as they are found; a re-run with the same settings reuses them and searches
    only what is missing (a cut last line is dropped), and a file that is not capacity rows is refused."""
    import kvforge.eval.capacity as capacity

    first = run_capacity(small, ["knorm"], [0.75], str(tmp_path), step=128, limit=512)
    lines = (tmp_path / "capacity.jsonl").read_text().splitlines()
    assert len(lines) == 2
    (tmp_path / "capacity.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing row 2
    tried = []
    real = capacity.fits
    monkeypatch.setattr(capacity, "fits", lambda *a, **k: tried.append(a[1]) or real(*a, **k))
    again = run_capacity(small, ["knorm"], [0.75], str(tmp_path), step=128, limit=512)
    assert [r["max_context"] for r in again] == [r["max_context"] for r in first]
    assert tried and all(p is not None for p in tried)  # `none` came from the file; only knorm was searched
    assert len((tmp_path / "capacity.jsonl").read_text().splitlines()) == 2
    tried.clear()
    run_capacity(small, ["knorm"], [0.75], str(tmp_path), step=128, limit=512)
    assert tried == []  # everything was found before
    other = run_capacity(small, ["knorm"], [0.75], str(tmp_path), step=128, limit=384)  # other settings: searched
    assert len(tried) > 0 and all(r["searched_up_to"] == 384 for r in other)
    (tmp_path / "capacity.jsonl").write_text("not json\n")
    with pytest.raises(KVForgeError, match="line 1 is not a capacity row"):
        run_capacity(small, ["knorm"], [0.75], str(tmp_path), step=128, limit=512)
