"""benchmarks/sharing_throughput.py's parts that run on the CPU: the batch search and the attention choice."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sharing_throughput as st  # noqa: E402

from kvforge import KVCache, models  # noqa: E402

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=32000, max_position_embeddings=512)


@pytest.mark.parametrize("limit, growth, resolution", [(200, 2, 4), (1000, 2, 8), (130, 4, 4), (100, 2, 0)])
def test_search_finds_a_batch_that_fits_within_the_resolution_of_the_limit(limit, growth, resolution):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit

    found = st.search(fits, growth, 4096, resolution, first=16)
    assert found <= limit and fits(found)
    if resolution:
        first_fail = min(b for b in tried if b > limit)
        assert first_fail - found <= max(1, found // resolution)


def test_search_returns_zero_when_the_first_batch_does_not_fit():
    assert st.search(lambda b: False, 2, 1024, 4, first=64) == 0


@pytest.mark.parametrize("preset", ["dense", "cla", "lckv"])
def test_kvforge_attention_gives_the_logits_of_sdpa(monkeypatch, preset):
    """`--attention kvforge` changes only how GQA reaches SDPA (no repeat_kv copy), not what the models compute:
    a chunked prefill and a decode step through a KVCache, both implementations, the same random weights."""
    monkeypatch.setitem(models.RANDOM_CONFIGS, "tiny-throughput", TINY)
    ids = torch.randint(10, 30000, (3, 40), generator=torch.Generator().manual_seed(0))
    logits = []
    for attention in ("sdpa", "kvforge"):
        torch.manual_seed(0)  # build() fills the weights from the global generator
        model = st.build(preset, "tiny-throughput", torch.float32, "cpu", 1, 16, attention)
        assert model.config._attn_implementation == attention
        cache = KVCache(model, reserve=8)
        with torch.no_grad():
            parts = [model(ids[:, a:b], past_key_values=cache).logits for a, b in ((0, 24), (24, 40), (0, 1))]
        logits.append(torch.cat(parts, 1))
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("probe_limit", [150, 200, 230, 260, 400, 5])
def test_refine_finds_the_timed_limit_from_a_probe_bracket_that_may_be_wrong(probe_limit):
    """The probe's bracket is a guess: whether it is right (150 < 200), too pessimistic or too optimistic, the timed
    runs alone decide, and the answer fits and lies within the resolution of the first timed failure."""
    limit, tried = 200, []

    def fits(b):
        tried.append(b)
        return b <= limit

    lo = st.search(lambda b: b <= probe_limit, 2, 4096, 4, first=16)
    hi = None if lo * 2 > 4096 else next(b for b in range(lo + 1, 4097) if b > probe_limit)
    found = st.refine(fits, lo, hi, 4096, 4)
    assert found <= limit and found in tried
    first_fail = min(b for b in tried if b > limit)
    assert first_fail - found <= max(1, found // 4)


def test_refine_returns_zero_when_nothing_fits_a_timed_run():
    assert st.refine(lambda b: False, 64, 96, 1024, 4) == 0


def test_a_probe_generates_one_token_after_prompt_plus_new_tokens_and_one_pass(monkeypatch):
    """The memory probe asks generate for the final cache length and a single pass per chunk (lckv), no timing."""
    seen = {}
    model = torch.nn.Module()
    model.config = type("C", (), {"layer_map": type("M", (), {"has_upward": True})()})()

    def generate(ids, **kw):
        seen.update(kw, prompt=ids.shape[1])
        return torch.zeros(ids.shape[0], ids.shape[1] + kw["max_new_tokens"], dtype=torch.long)

    model.generate = generate
    monkeypatch.setattr(st, "KVCache", lambda m, reserve: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    row = st.run_once(model, 2, 48, 16, "cpu", chunk=16, probe=True)
    assert row == {"probe": True, "peak_gib": 3.0}
    assert (seen["prompt"], seen["max_new_tokens"], seen["num_iterations"]) == (64, 1, 1)


def test_predict_finds_where_an_affine_peak_reaches_the_cap():
    # 16 GiB of weights + 0.25 GiB per row: 78 GiB at 248 rows
    assert st.predict(64, 32.0, 128, 48.0, 78.0) == pytest.approx(248)
    with pytest.raises(SystemExit, match="not growing"):
        st.predict(64, 32.0, 128, 32.0, 78.0)
