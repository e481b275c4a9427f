"""Chunked prefill (`chunk_size`): without a press it answers like an unchunked prefill and plain `model.generate`;
with a press every chunk is compressed as it comes, keeping the ratio of the real tokens seen so far."""

import pytest
import torch
from helpers import CONTEXT, CONTEXTS, QUESTIONS
from test_engine import plain_generate

from kvforge import KVCache, KVForgeError, generate, get_press
from kvforge.cache.layers import PackedHeadLayer
from kvforge.generate import chunk_bounds, prefill
from kvforge.models import tiny_model


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("llama", "gemma3")}


def test_chunk_bounds_cut_from_the_end():
    assert chunk_bounds(10, None) == [(0, 10)]
    assert chunk_bounds(10, 10) == chunk_bounds(10, 64) == [(0, 10)]
    assert chunk_bounds(10, 4) == [(0, 2), (2, 6), (6, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 1) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("chunk", [5, 16, 33])
def test_chunked_no_press_equals_unchunked_and_plain_generate(models, smol_tokenizer, family, chunk):
    model, tok = models[family], smol_tokenizer
    want = plain_generate(model, tok, CONTEXTS, QUESTIONS[0], 16)  # left-padded batch of ragged contexts
    for press in (None, get_press("knorm", compression_ratio=0.0)):
        got = generate(model, tok, CONTEXTS, QUESTIONS[:1], press=press, max_new_tokens=16, chunk_size=chunk)
        assert [a[0] for a in got] == want
    alone = generate(model, tok, CONTEXTS[0], QUESTIONS[:1], max_new_tokens=16, chunk_size=chunk)
    assert alone == generate(model, tok, CONTEXTS[0], QUESTIONS[:1], max_new_tokens=16)


def _batch(tok, contexts):
    rows = [tok(c)["input_ids"] for c in contexts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("name", ["knorm", "snapkv", "tova", "streamingllm", "adakv"])
@pytest.mark.parametrize("chunk", [7, 24])
def test_chunked_press_keeps_the_ratio_of_what_was_seen(models, smol_tokenizer, name, chunk):
    model, ratio = models["llama"], 0.75
    ids, mask = _batch(smol_tokenizer, CONTEXTS)
    cache = KVCache(model, press=get_press(name, compression_ratio=ratio), chunk_size=chunk)
    prefill(model, ids, mask, cache)
    n_real = mask.sum(-1)  # [B]
    want = (n_real.double() * (1 - ratio)).long()
    for i in cache.compressible_layers():
        _, _, slots, valid = cache.layers[i].entries()
        real = valid & mask.bool().gather(1, slots.flatten(1)).view_as(valid)  # entries of real tokens
        kept = real.sum(-1)  # [B, H_kv]
        if name == "adakv":  # per-head budgets: the row's total is H_kv × the uniform count
            assert kept.sum(-1).tolist() == (want * kept.shape[1]).tolist()
        else:
            assert (kept == want[:, None]).all(), (kept, want)
        assert cache.layers[i].get_seq_length() == ids.shape[1]


def _reference_knorm_layer0(model, ids, mask, chunk, ratio):
    """Slow twin of chunked knorm on layer 0, whose keys do not depend on what was evicted: per row and head, keep
    the `int(seen · (1 − ratio))` lowest-norm keys of (kept so far + the chunk's real tokens), chunk by chunk."""
    full = KVCache(model)
    prefill(model, ids, mask, full)
    norms = full.layers[0].keys.float().norm(dim=-1)  # [B, H, L]
    b, h, length = norms.shape
    kept = [[[] for _ in range(h)] for _ in range(b)]
    for start, stop in chunk_bounds(length, chunk):
        for r in range(b):
            new = [t for t in range(start, stop) if mask[r, t]]
            seen = int(mask[r, :stop].sum())
            k = int(seen * (1 - ratio))
            for hd in range(h):
                cand = kept[r][hd] + new
                kept[r][hd] = sorted(sorted(cand, key=lambda t: (float(norms[r, hd, t]), t))[:k])
    return kept


@pytest.mark.parametrize("chunk", [6, 19])
def test_chunked_knorm_equals_its_slow_reference_on_layer_0(models, smol_tokenizer, chunk):
    model, ratio = models["llama"], 0.5
    ids, mask = _batch(smol_tokenizer, CONTEXTS)
    cache = KVCache(model, press=get_press("knorm", compression_ratio=ratio), chunk_size=chunk)
    prefill(model, ids, mask, cache)
    _, _, slots, valid = cache.layers[0].entries()
    want = _reference_knorm_layer0(model, ids, mask, chunk, ratio)
    for r in range(ids.shape[0]):
        for hd in range(slots.shape[1]):
            got = sorted(int(t) for t, v in zip(slots[r, hd], valid[r, hd]) if v and mask[r, t])
            assert got == want[r][hd]


@pytest.mark.parametrize("name", ["knorm", "snapkv", "adakv"])
def test_chunked_batch_equals_each_context_alone(models, smol_tokenizer, name):
    model, tok = models["llama"], smol_tokenizer
    press = get_press(name, compression_ratio=0.5)
    batch = generate(model, tok, CONTEXTS, QUESTIONS[:1], press=press, max_new_tokens=8, chunk_size=12)
    assert batch == [generate(model, tok, c, QUESTIONS[:1], press=press, max_new_tokens=8, chunk_size=12)
                     for c in CONTEXTS]


def test_whole_context_presses_refuse_chunking(models):
    model = models["llama"]
    for name in ("observed_attention", "expected_attention", "nacl", "pyramidkv", "kvzip", "chunk", "h2o"):
        with pytest.raises(KVForgeError, match=f"^{name} cannot compress a prefill chunk by chunk: "):
            KVCache(model, press=get_press(name, compression_ratio=0.5), chunk_size=8)


def test_a_long_forward_into_a_chunked_armed_cache_is_refused(models, smol_tokenizer):
    model = models["llama"]
    ids = torch.tensor([smol_tokenizer(CONTEXT)["input_ids"]])
    cache = KVCache(model, press=get_press("knorm", compression_ratio=0.5), chunk_size=8)
    with pytest.raises(KVForgeError, match="chunk_size=8; prefill with kvforge.generate.prefill"):
        model(ids, past_key_values=cache)


def test_chunked_per_head_budgets_packed_equal_padded(models):
    """AdaKV under chunking on both per-head layouts (packed segments re-packed every chunk, padded blocks): the same
    kept entries, and each row keeps H_kv × its uniform count of what it has seen."""
    model = models["llama"]
    ids = torch.randint(5, 900, (3, 60), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    mask[2, :40] = 0
    kept = {}
    for packed in (True, False):
        cache = KVCache(model, press=get_press("adakv", compression_ratio=0.5, press="knorm"), chunk_size=9,
                        packed=packed)
        prefill(model, ids, mask, cache)
        _, _, slots, valid = cache.layers[0].entries()
        real = valid & mask.bool().gather(1, slots.flatten(1)).view_as(valid)
        assert real.sum(-1).sum(-1).tolist() == [30 * 2, 23 * 2, 10 * 2]
        kept[packed] = torch.where(real, slots, -1).sort(-1).values
    assert torch.equal(kept[True], kept[False])


def test_chunks_over_packed_segments_equal_the_masked_padded_reference(models, monkeypatch):
    """With no padding, a chunk over a packed per-head layer attends each (row, KV head) segment on its own,
    bottom-right causal (`segment_attention`, no `[B, H_kv, G·q, n]` mask): the same kept entries and logits as the
    eager reference over the padded block under its per-head mask, for every layer of a 2-row batch."""
    import kvforge.attention.function as attention
    from kvforge.attention.function import use_backend

    calls = []
    real = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention", lambda *a: calls.append(1) or real(*a))
    model = models["llama"]
    ids = torch.randint(5, 900, (2, 70), generator=torch.Generator().manual_seed(4))
    got = {}
    for backend in ("sdpa", "eager"):
        cache = KVCache(model, press=get_press("adakv", compression_ratio=0.6, press="snapkv"), chunk_size=16,
                        packed=True)
        with use_backend(backend):
            logits = prefill(model, ids, torch.ones_like(ids), cache)
        assert all(isinstance(layer, PackedHeadLayer) for layer in cache.layers)
        assert len(set(cache.layers[0].lengths.tolist())) > 1  # ragged heads: the case the segments are for
        got[backend] = (logits, [layer.entries()[2].sort(-1).values for layer in cache.layers])
    assert len(calls) == 4 * len(model.model.layers)  # every chunk after the first, every layer, took the segments
    assert torch.allclose(got["sdpa"][0], got["eager"][0], atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(got["sdpa"][1], got["eager"][1]))


def _bottom_right_case(device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 8, 40, 64, device=device, dtype=dtype, generator=g)
    k = torch.randn(2, 2, 150, 64, device=device, dtype=dtype, generator=g)
    v = torch.randn(2, 2, 150, 64, device=device, dtype=dtype, generator=g)
    return q, k, v


def test_bottom_right_causal_sdpa_equals_the_eager_reference():
    """A chunk after earlier ones (q < n, no mask tensor): SDPA through `causal_lower_right` equals the eager
    reference, whose causal mask is bottom-right by construction."""
    from kvforge.attention.backends import eager, sdpa

    q, k, v = _bottom_right_case("cpu", torch.float32)
    torch.testing.assert_close(sdpa(q, k, v, None, is_causal=True), eager(q, k, v, None, is_causal=True),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bottom_right_causal_sdpa_on_cuda(dtype):
    """On CUDA the bottom-right causal goes to flash attention with GQA (bf16) or is materialised (float32)."""
    from kvforge.attention.backends import eager, sdpa

    q, k, v = _bottom_right_case("cuda", dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(sdpa(q, k, v, None, is_causal=True).float(),
                               eager(q, k, v, None, is_causal=True).float(), atol=tol, rtol=tol)
