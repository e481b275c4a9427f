"""KVzip: scores against a slow eager reference, levels, evict == retain, no leftover repeat KV, batching,
one scoring pass per prefill, head scores."""

import copy
import json

import pytest
import torch
from helpers import CONTEXT, CONTEXTS, QUESTIONS
from transformers import DynamicCache

from kvforge import generate, get_press
from kvforge.cache import HeadVarlenLayer
from kvforge.errors import KVForgeError
from kvforge.generate import answer, compress_prefilled, encode, prefill_context
from kvforge.models import tiny_model
from kvforge.presses import kvzip as kz

CHUNK = 24  # several chunks per context, so the "starting with" prompt is exercised


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models are launch-bound: one thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("llama", "gemma3")}


def _enc(model, tok, contexts, questions=QUESTIONS):
    return encode(model, tok, contexts, [questions] * len(contexts), max_new_tokens=8)


def _press(**kw):
    kw.setdefault("chunk_size", CHUNK)
    return get_press("kvzip", **kw)


def reference_scores(model, enc, plan) -> torch.Tensor:
    """Slow, independent: stock eager attention with output_attentions on a DynamicCache, one row."""
    model.set_attn_implementation("eager")
    try:
        cfg = model.config
        full = [i for i, t in enumerate(getattr(cfg, "layer_types", None) or ["full_attention"] * 99)
                if t == "full_attention"][: cfg.num_hidden_layers]
        ids = enc.ctx_ids[:, plan.pad :]
        width = ids.shape[1]
        base = DynamicCache(config=cfg)
        with torch.no_grad():
            model(ids, past_key_values=base, use_cache=True)
        h, g = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        out = torch.zeros(len(full), h, width)
        out[:, :, : plan.protected] = float("inf")
        at = plan.protected
        for c, chunk in enumerate(plan.chunks):
            rep = torch.tensor([plan.prompts[c]])
            r = rep.shape[1]
            with torch.no_grad():  # a fresh copy of the prefilled cache for every chunk
                att = model(rep, past_key_values=copy.deepcopy(base), output_attentions=True).attentions
            cols = list(range(plan.protected)) + list(range(at, at + len(chunk))) + list(range(width, width + r))
            for li, layer in enumerate(full):
                p = att[layer][0][:, :, cols].double()  # [Hq, r, s + c + r], already causal
                p = p / p.sum(-1, keepdim=True)  # softmax restricted to [sinks | chunk | repeat]
                p = p[:, :, plan.protected : plan.protected + len(chunk)].reshape(h, g, r, len(chunk))
                out[li, :, at : at + len(chunk)] = p.amax(dim=(1, 2)).float()
            at += len(chunk)
        return out
    finally:
        model.set_attn_implementation("kvforge")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_scores_match_eager_reference(models, smol_tokenizer, family):
    model, tok = models[family], smol_tokenizer
    enc = _enc(model, tok, [CONTEXT])
    cache = prefill_context(model, enc, None, 8)
    plans = kz.plan_rows(enc, CHUNK, 4, 8)
    scores = kz.kvzip_scores(model, cache, enc, chunk_size=CHUNK)
    n_global = 2 if family == "gemma3" else 4  # gemma3: only the global layers are scored
    assert scores.shape == (n_global, 1, 2, enc.ctx_ids.shape[1])
    assert len(plans[0].chunks) >= 3
    ref = reference_scores(model, enc, plans[0])
    torch.testing.assert_close(scores[:, 0], ref, rtol=1e-4, atol=1e-6)


def test_prompts_and_protected_prefix(smol_tokenizer):
    tok = smol_tokenizer
    prefix, suffix = kz.template_parts(tok, None)
    assert tok.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    row = tok(tok.apply_chat_template([{"role": "user", "content": "Bees and hives."}], tokenize=False),
              add_special_tokens=False)["input_ids"]
    p = kz.protected_length(row, prefix, 4)
    assert tok.decode(row[:p]).endswith("<|im_start|>user\n") and tok.decode(row[p:]).startswith("Bees")
    chunks = [list(range(100, 120)), list(range(200, 210))]
    prompts = kz.repeat_prompts(tok, chunks, suffix, 8)
    assert tok.decode(prompts[0]) == "\n\nRepeat the previous context exactly." + tok.decode(suffix + chunks[0])
    assert tok.decode(prompts[1]) == ("\n\nRepeat the part of the previous context exactly, starting with "
                                      + tok.decode(chunks[0][-8:] + suffix + chunks[1]))
    no_template_prefix, no_suffix = kz.template_parts(tok, False)
    assert no_suffix == [] and kz.protected_length([5, 6, 7, 8, 9, 10], no_template_prefix, 4) == 4


def test_pair_gives_unequal_heads_summing_to_budget(models, smol_tokenizer):
    model, tok = models["llama"], smol_tokenizer
    enc = _enc(model, tok, [CONTEXT])
    plan = kz.plan_rows(enc, CHUNK, 4, 8)[0]
    n = enc.ctx_ids.shape[1]
    for ratio in (0.3, 0.7):
        _, cache = generate(model, tok, CONTEXT, QUESTIONS[:1], press=_press(compression_ratio=ratio),
                            max_new_tokens=2, return_cache=True)
        counts = [c for i in cache.compressible_layers() for c in cache.layers[i].entry_counts()]
        e = n - plan.protected
        assert sum(counts) == (plan.protected + int(e * (1 - ratio))) * len(counts)  # one global budget
        assert len(set(counts)) > 1 and min(counts) >= plan.protected
        assert all(isinstance(cache.layers[i], HeadVarlenLayer) for i in cache.compressible_layers())
        # pair-uniform: the same count in every head
        _, cache = generate(model, tok, CONTEXT, QUESTIONS[:1], max_new_tokens=2, return_cache=True,
                            press=_press(compression_ratio=ratio, level="pair-uniform"))
        assert all(layer.n == plan.protected + int(e * (1 - ratio)) for layer in cache.layers)


def _head_file(tmp_path, n_layers=4, h=2):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"scores": torch.arange(n_layers * h).reshape(n_layers, h).flip(0).tolist()}))
    return str(path)


@pytest.mark.parametrize("level", ["pair", "pair-uniform", "head"])
def test_retain_equals_evict(models, smol_tokenizer, tmp_path, level):
    model, tok = models["llama"], smol_tokenizer
    extra = {"head_scores_path": _head_file(tmp_path)} if level == "head" else {}
    for ratio in (0.3, 0.6):
        got = {}
        # evict: padded head-varlen (CPU's default) and packed segments (CUDA's default); retain: masks
        for mode, packed in (("evict", False), ("evict", True), ("retain", None)):
            press = _press(compression_ratio=ratio, level=level, mode=mode, **extra)
            ans, cache = generate(model, tok, CONTEXTS[:2], QUESTIONS, press=press, max_new_tokens=10,
                                  return_cache=True, packed=packed)
            # dense evict (pair-uniform) stores the batch's padding fillers too: compare visible bytes elsewhere
            got[(mode, packed)] = (ans, cache.stats()["bytes"] if level != "pair-uniform" else None)
        assert got[("evict", False)] == got[("evict", True)] == got[("retain", None)]


def test_head_level_drops_whole_heads(models, smol_tokenizer, tmp_path):
    model, tok = models["llama"], smol_tokenizer
    enc = _enc(model, tok, [CONTEXT])
    plan = kz.plan_rows(enc, CHUNK, 4, 8)[0]
    n = enc.ctx_ids.shape[1]
    _, cache = generate(model, tok, CONTEXT, QUESTIONS[:1], max_new_tokens=2, return_cache=True,
                        press=_press(compression_ratio=0.5, level="head", head_scores_path=_head_file(tmp_path)))
    counts = [c for layer in cache.layers for c in layer.entry_counts()]
    assert sorted(set(counts)) == [plan.protected, n] and counts.count(n) == 4  # int(8 * 0.5) heads kept
    assert counts[:2] == [n, n] and counts[-2:] == [plan.protected] * 2  # highest head scores: layer 0
    with pytest.raises(KVForgeError, match="shape"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"scores": [[1.0, 2.0]]}))
        generate(model, tok, CONTEXT, QUESTIONS[:1], max_new_tokens=2,
                 press=_press(compression_ratio=0.5, level="head", head_scores_path=str(bad)))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["evict", "retain"])
def test_repeat_kv_never_remains(models, smol_tokenizer, family, mode):
    model, tok = models[family], smol_tokenizer
    enc = _enc(model, tok, CONTEXTS[:2])
    width = enc.ctx_ids.shape[1]
    plain = prefill_context(model, enc, None, 8)
    cache = prefill_context(model, enc, _press(compression_ratio=0.5, mode=mode), 8)
    for i, layer in enumerate(cache.layers):
        if i in cache.compressible_layers():
            assert layer.get_seq_length() == width  # logical: the context only
            assert layer.n == width if mode == "retain" else layer.n < width
            slots = layer.entry_slots()
            assert slots is None if mode == "retain" else int(slots.max()) < width
        else:  # gemma3's sliding layers: exactly what a plain prefill leaves
            torch.testing.assert_close(layer.keys, plain.layers[i].keys, rtol=0, atol=0)
            assert layer.get_seq_length() == plain.layers[i].get_seq_length()
    # scoring alone leaves the cache bit-identical
    before = [(layer.keys.clone(), layer.get_seq_length()) for layer in plain.layers]
    kz.kvzip_scores(model, plain, enc, chunk_size=CHUNK)
    for (k, n), layer in zip(before, plain.layers):
        assert layer.get_seq_length() == n and torch.equal(layer.keys, k)


def test_noop_ratio_equals_plain_generation(models, smol_tokenizer, monkeypatch):
    model, tok = models["llama"], smol_tokenizer
    calls = []
    monkeypatch.setattr(kz, "kvzip_scores", lambda *a, **k: calls.append(1))
    plain = generate(model, tok, CONTEXTS, QUESTIONS, press=None, max_new_tokens=12)
    for press in (_press(compression_ratio=0.0), _press(budget=10_000, mode="retain")):
        assert generate(model, tok, CONTEXTS, QUESTIONS, press=press, max_new_tokens=12) == plain
    assert not calls  # no scoring pass when nothing is removed


@pytest.mark.parametrize("level", ["pair", "pair-uniform"])
def test_batch_equals_alone(models, smol_tokenizer, level):
    model, tok = models["llama"], smol_tokenizer
    press = _press(compression_ratio=0.5, level=level)
    enc = _enc(model, tok, CONTEXTS)
    batch_scores = kz.kvzip_scores(model, prefill_context(model, enc, None, 8), enc, chunk_size=CHUNK)
    for row, c in enumerate(CONTEXTS):
        e1 = _enc(model, tok, [c])
        alone = kz.kvzip_scores(model, prefill_context(model, e1, None, 8), e1, chunk_size=CHUNK)
        n = e1.ctx_ids.shape[1]
        torch.testing.assert_close(batch_scores[:, row, :, -n:], alone[:, 0], rtol=1e-4, atol=1e-6)
        assert bool((batch_scores[:, row, :, :-n] == float("-inf")).all())  # padding
    batch = generate(model, tok, CONTEXTS, QUESTIONS, press=press, max_new_tokens=10)
    assert batch == [generate(model, tok, c, QUESTIONS, press=press, max_new_tokens=10) for c in CONTEXTS]


def test_one_scoring_pass_serves_every_ratio(models, smol_tokenizer, monkeypatch):
    model, tok = models["llama"], smol_tokenizer
    real = kz.kvzip_scores
    calls = []
    monkeypatch.setattr(kz, "kvzip_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = _enc(model, tok, CONTEXTS[:2])
    full = prefill_context(model, enc, None, 8, record=True)
    for ratio in (0.3, 0.5, 0.7):
        for mode in ("retain", "evict"):
            press = _press(compression_ratio=ratio, mode=mode)
            fork = compress_prefilled(full, press, model, enc)
            shared = answer(model, tok, fork, enc, 8)
            assert shared == answer(model, tok, prefill_context(model, enc, press, 8), enc, 8)  # end to end
    # 1 pass for the six forks of the shared prefill + 1 per end-to-end prefill (a new cache each time)
    assert len(calls) == 1 + 6
    assert full.layers[0].n == enc.ctx_ids.shape[1] and full.layers[0].entry_valid() is None  # base untouched


def test_options_are_checked():
    for bad in ({"level": "token"}, {"mode": "drop"}, {"level": "head"}, {"chunk_size": 0}):
        with pytest.raises(KVForgeError, match="kvzip"):
            get_press("kvzip", compression_ratio=0.5, **bad)


def test_head_scores_command(models, smol_tokenizer, tmp_path):
    from kvforge.calibrate.kvzip import compute_head_scores, save_head_scores

    model, tok = models["llama"], smol_tokenizer
    scores = compute_head_scores(model, tok, length=300, samples=2, chunk_size=128)
    assert scores.shape == (4, 2) and bool(torch.isfinite(scores).all()) and bool((scores > 0).all())
    path = save_head_scores(tmp_path / "h.json", scores, model="tiny")
    torch.testing.assert_close(kz.load_head_scores(str(path)), scores)
    ans = generate(model, tok, CONTEXT, QUESTIONS[:1], max_new_tokens=4,
                   press=_press(compression_ratio=0.4, level="head", head_scores_path=str(path)))
    assert len(ans) == 1
