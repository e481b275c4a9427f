"""Merging presses (CaM, KVMerger, merge wrapper), composed and chunk wrappers, and the query-aware switch.

Merges are checked against hand computations on constructed inputs; every press runs batched through
`generate` on tiny llama and gemma3 models and must equal each context alone.
"""

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from helpers import CONTEXT, QUESTIONS

from kvforge import KVForgeError, generate, get_press
from kvforge.cache import DenseLayer, HeadVarlenLayer, KVCache
from kvforge.cli import build_parser
from kvforge.eval.runner import parse_press, run_eval
from kvforge.generate import answer, compress_prefilled, encode, encode_prompt, prefill_context
from kvforge.models import tiny_config, tiny_model
from kvforge.presses import LayerContext, Press, ScorerPress
from kvforge.presses.chunk import ChunkPress

CONTEXTS = [CONTEXT, "A short note about the mill and the river, and the bees that live by the water."]
H_KV, G, D = 2, 2, 16  # tiny llama: 2 KV heads, 4 query heads, head_dim 16


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("llama", "gemma3")}


@dataclass
class FixedScores(ScorerPress):
    """A scorer with given scores `[B | 1, H_kv, n]` (test helper, not registered)."""

    table: object = None

    def score(self, ctx):
        return self.table.expand(ctx.keys.shape[0], -1, -1).clone()


def make_ctx(keys, values, query, scaling=None) -> LayerContext:
    """One contiguous prefill layer holding `keys/values [B, H_kv, n, D]`, queried by `query [B, Hq, n, D]`."""
    cache = KVCache(tiny_config("llama", num_hidden_layers=1))
    cache.layers[0].update(keys, values)
    return LayerContext(None, cache, 0, query, None, scaling)


def attention_by_hand(keys, query, window):
    """Mean causal softmax attention of the last `window` queries per KV head (mean over the group), [B, H, n]."""
    b, hq, n, d = query.shape
    out = torch.zeros(b, keys.shape[1], n)
    for bi in range(b):
        for qh in range(hq):
            h = qh // (hq // keys.shape[1])
            for i in range(n - window, n):
                logits = (keys[bi, h, : i + 1] @ query[bi, qh, i]) / math.sqrt(d)
                out[bi, h, : i + 1] += torch.softmax(logits, -1) / (window * (hq // keys.shape[1]))
    return out


def orthonormal(n, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :n].T.contiguous()  # [n, d], rows orthonormal


def kept_slots(layer, b=0, h=0):
    return layer.entry_slots()[b, h].tolist() if layer.entry_slots() is not None else list(range(layer.n))


# -- CaM ---------------------------------------------------------------------------------------------------------

def test_cam_merged_values_equal_hand_computation():
    torch.manual_seed(1)
    n, m, w = 12, 2, 4
    keys, values = torch.randn(1, H_KV, n, D), torch.randn(1, H_KV, n, D)
    query = torch.randn(1, H_KV * G, n, D)
    kept = [[0, 3, 5, 8, 10, 11], [1, 2, 4, 6, 7, 9]]  # head 1: entries 10, 11 have no kept successor
    table = torch.zeros(1, H_KV, n)
    for h, ks in enumerate(kept):
        table[0, h, ks] = 1.0
    ctx = make_ctx(keys, values, query)
    press = get_press("cam", press=FixedScores(table=table), merge_budget=m, window_size=w, compression_ratio=0.5)
    press.compress(ctx)
    layer = ctx.cache.layers[0]
    a = attention_by_hand(keys, query, w)
    for h, ks in enumerate(kept):
        expected = values[0, h, ks].clone()
        for e in sorted(set(range(n)) - set(ks)):
            targets = [r for r, j in enumerate(ks) if j > e][:m]
            if not targets:
                continue  # nothing kept after e: dropped unmerged
            p = min(1.0, float(a[0, h, e] / a[0, h, [ks[r] for r in targets]].mean()))
            for r in targets:
                expected[r] += p * values[0, h, e] / len(targets)
        assert kept_slots(layer, 0, h) == ks
        torch.testing.assert_close(layer.values[0, h], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.keys[0, h], keys[0, h, ks])  # keys are not merged


# -- KVMerger ----------------------------------------------------------------------------------------------------

def test_kvmerger_run_of_similar_keys_collapses_to_gaussian_combination():
    torch.manual_seed(2)
    n = 10
    basis = orthonormal(n)  # adjacent cosine 0 everywhere ...
    keys = (basis * torch.rand(n, 1).add(1.0))[None, None].repeat(1, H_KV, 1, 1)
    keys[:, :, 3] = keys[:, :, 2] + 0.05 * torch.randn(1, H_KV, D)  # ... except the run 2, 3, 4
    keys[:, :, 4] = keys[:, :, 2] + 0.05 * torch.randn(1, H_KV, D)
    values = torch.randn(1, H_KV, n, D)
    query = torch.randn(1, H_KV * G, n, D)
    ctx = make_ctx(keys.clone(), values.clone(), query)
    get_press("kvmerger", window_size=3, compression_ratio=0.2).compress(ctx)  # keep 8 of 10: 2 joins
    layer = ctx.cache.layers[0]
    a = attention_by_hand(keys, query, 3)
    assert layer.n == 8
    for h in range(H_KV):
        run = [2, 3, 4]
        p = run[int(a[0, h, run].argmax())]
        dist = (keys[0, h, run] - keys[0, h, p]).norm(dim=-1)
        sigma = dist.sum() / (math.sqrt(2) * len(run))
        g = torch.exp(-dist**2 / (2 * sigma**2))
        wts = g / g.sum()
        assert kept_slots(layer, 0, h) == [0, 1, p, 5, 6, 7, 8, 9]
        torch.testing.assert_close(layer.keys[0, h, 2], (wts[:, None] * keys[0, h, run]).sum(0))
        torch.testing.assert_close(layer.values[0, h, 2], (wts[:, None] * values[0, h, run]).sum(0))
        torch.testing.assert_close(layer.keys[0, h, [0, 1, 3, 4]], keys[0, h, [0, 1, 5, 6]])  # others untouched


def test_kvmerger_without_similar_keys_evicts_by_attention_and_respects_budget():
    n = 10
    keys = orthonormal(n)[None, None].repeat(1, H_KV, 1, 1)
    values, query = torch.randn(1, H_KV, n, D), torch.randn(1, H_KV * G, n, D)
    ctx = make_ctx(keys, values, query)
    get_press("kvmerger", window_size=3, compression_ratio=0.5).compress(ctx)
    layer = ctx.cache.layers[0]
    a = attention_by_hand(keys, query, 3)
    for h in range(H_KV):
        top = sorted(a[0, h, :7].argsort(descending=True)[:2].tolist())
        assert kept_slots(layer, 0, h) == top + [7, 8, 9]
        torch.testing.assert_close(layer.values[0, h], values[0, h, top + [7, 8, 9]])


# -- merge wrapper -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["pivot", "weighted"])
def test_merge_wrapper_merges_evicted_into_nearest_kept(method):
    torch.manual_seed(3)
    n = 8
    basis = orthonormal(4, seed=3) * 3
    near = [0, 0, 1, 2, 2, 2, 3, 3]  # entry t's key is close to basis[near[t]]
    keys = torch.stack([basis[j] + 0.1 * torch.randn(D) for j in near])[None, None].repeat(1, H_KV, 1, 1)
    values, query = torch.randn(1, H_KV, n, D), torch.randn(1, H_KV * G, n, D)
    kept = [0, 2, 3, 6]  # one kept entry per direction; head 1 keeps another set
    kept1 = [1, 2, 5, 7]
    table = torch.zeros(1, H_KV, n)
    table[0, 0, kept], table[0, 1, kept1] = 1.0, 1.0
    ctx = make_ctx(keys, values, query)
    press = get_press("merge", press=FixedScores(table=table), method=method, window_size=4, compression_ratio=0.5)
    press.compress(ctx)
    layer = ctx.cache.layers[0]
    a = attention_by_hand(keys, query, 4)
    for h, ks in enumerate([kept, kept1]):
        assert kept_slots(layer, 0, h) == ks
        for x, stored in ((keys, layer.keys), (values, layer.values)):
            for r, j in enumerate(ks):
                group = [e for e in range(n) if e not in ks and near[e] == near[j]]
                if method == "pivot":  # mean of x_j and the pair means (x_e + x_j) / 2
                    want = (x[0, h, j] + sum((x[0, h, e] + x[0, h, j]) / 2 for e in group)) / (1 + len(group))
                else:
                    wts = [a[0, h, j]] + [a[0, h, e] for e in group]
                    want = sum(wt * x[0, h, t] for wt, t in zip(wts, [j] + group)) / sum(wts)
                torch.testing.assert_close(stored[0, h, r], want, rtol=1e-5, atol=1e-5)


def test_merge_wrapper_rejects_bad_options():
    with pytest.raises(KVForgeError, match="method"):
        get_press("merge", method="mean")
    with pytest.raises(KVForgeError, match="press"):
        get_press("merge", press="cam")


# -- composed ----------------------------------------------------------------------------------------------------

@dataclass
class Hooked(Press):
    """Counts the hooks the engine calls (test helper)."""

    calls: dict = field(default_factory=dict)

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def compress(self, ctx):
        self._count("compress")

    def after_prefill(self, model, cache, enc):
        self._count("after_prefill")

    def on_decode(self, ctx):
        self._count("on_decode")

    def select(self, ctx):
        self._count("select")
        return None


def test_composed_applies_presses_in_sequence(models, smol_tokenizer):
    model, tok = models["llama"], smol_tokenizer
    n = len(encode_prompt(tok, CONTEXT, QUESTIONS[0])[0])
    composed = get_press("composed", presses=["snapkv", "knorm"], compression_ratio=0.5)
    assert [p.compression_ratio for p in composed.presses] == [0.5, 0.5]
    _, cache = generate(model, tok, CONTEXT, QUESTIONS[:1], press=composed, max_new_tokens=2, return_cache=True)
    assert all(layer.n == int(int(n * 0.5) * 0.5) for layer in cache.layers)
    # the same as SnapKV, then Knorm on what SnapKV left, by hand
    by_hand = KVCache(model, press=get_press("snapkv", compression_ratio=0.5))
    by_hand.recorded = {}
    ids = torch.tensor([encode_prompt(tok, CONTEXT, QUESTIONS[0])[0]])
    with torch.no_grad():
        model(ids, past_key_values=by_hand)
    knorm = get_press("knorm", compression_ratio=0.5)
    for i in by_hand.compressible_layers():
        module, query, mask, scaling = by_hand.recorded[i]
        knorm.compress(LayerContext(module, by_hand, i, query, mask, scaling))
        assert kept_slots(cache.layers[i], 0, 1) == kept_slots(by_hand.layers[i], 0, 1)


def test_composed_flags_and_hooks_follow_its_presses(models, smol_tokenizer):
    plain = get_press("composed", presses=["snapkv", get_press("knorm", compression_ratio=0.3)])
    assert not plain.acts_while_decoding and not plain.has_extra_pass
    hooked = Hooked()
    press = get_press("composed", presses=["knorm", hooked], compression_ratio=0.5)
    assert press.acts_while_decoding and press.has_extra_pass
    generate(models["llama"], smol_tokenizer, CONTEXT, QUESTIONS[:1], press=press, max_new_tokens=3)
    layers = tiny_config("llama").num_hidden_layers
    assert hooked.calls["compress"] == layers and hooked.calls["after_prefill"] == 1
    assert hooked.calls["on_decode"] > 0 and hooked.calls["select"] > 0
    with pytest.raises(KVForgeError, match="empty"):
        get_press("composed", presses=[])
    with pytest.raises(KVForgeError, match="unknown press"):
        get_press("composed", presses=["nope"])


# -- chunk -------------------------------------------------------------------------------------------------------

@dataclass
class Recording(ScorerPress):
    """Knorm scores, recording how many keys and queries each call sees (test helper)."""

    seen: list = field(default_factory=list)

    def score(self, ctx):
        self.seen.append((ctx.keys.shape[2], ctx.query.shape[2]))
        return -ctx.keys.float().norm(dim=-1)


def test_chunk_keeps_the_ratio_in_every_chunk():
    torch.manual_seed(4)
    n, length = 40, 16  # chunks from the end: [0, 8), [8, 24), [24, 40)
    keys, values, query = torch.randn(1, H_KV, n, D), torch.randn(1, H_KV, n, D), torch.randn(1, H_KV * G, n, D)
    scorer = Recording()
    press = ChunkPress(press=scorer, chunk_length=length, compression_ratio=0.5)
    assert press.bounds(n) == [(0, 8), (8, 24), (24, 40)]
    ctx = make_ctx(keys, values, query)
    press.compress(ctx)
    assert scorer.seen == [(8, 8), (16, 16), (16, 16)]  # the scorer never sees more than a chunk
    layer = ctx.cache.layers[0]
    assert layer.n == 4 + 8 + 8
    for h in range(H_KV):
        slots = kept_slots(layer, 0, h)
        for start, stop in press.bounds(n):
            inside = [s for s in slots if start <= s < stop]
            assert len(inside) == int((stop - start) * 0.5)
            norms = keys[0, h, start:stop].norm(dim=-1)
            assert inside == sorted((norms.argsort()[: len(inside)] + start).tolist())  # lowest norms per chunk


def test_chunk_with_snapkv_counts_on_a_model(models, smol_tokenizer):
    model, tok = models["llama"], smol_tokenizer
    n = len(encode_prompt(tok, CONTEXT, QUESTIONS[0])[0])
    press = get_press("chunk", chunk_length=32, compression_ratio=0.5)
    _, cache = generate(model, tok, CONTEXT, QUESTIONS[:1], press=press, max_new_tokens=2, return_cache=True)
    expected = sum(int((stop - start) * 0.5) for start, stop in press.bounds(n))
    assert all(layer.n == expected for layer in cache.layers)
    with pytest.raises(KVForgeError, match="budget"):
        get_press("chunk", budget=10)


# -- every press through generate: batch == each context alone --------------------------------------------------

MATRIX = [
    ("cam", {}),
    ("kvmerger", {"threshold": 0.0}),  # random tiny models have few similar keys: a low threshold makes merges
    ("merge", {"method": "pivot"}),
    ("merge", {"method": "weighted", "press": "snapkv"}),
    ("composed", {"presses": ["snapkv", "knorm"]}),
    ("chunk", {"chunk_length": 24}),
]


MATRIX_IDS = ["cam", "kvmerger", "merge-pivot", "merge-weighted", "composed", "chunk"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name,kw", MATRIX, ids=MATRIX_IDS)
def test_batch_equals_each_context_alone(models, smol_tokenizer, family, name, kw):
    model, tok = models[family], smol_tokenizer
    press = get_press(name, compression_ratio=0.5, **kw)
    batch, cache = generate(model, tok, CONTEXTS, QUESTIONS, press=press, max_new_tokens=4, return_cache=True)
    assert batch == [generate(model, tok, c, QUESTIONS, press=press, max_new_tokens=4) for c in CONTEXTS]
    assert cache.stats()["bytes"] < cache.stats()["uncompressed_bytes"]


@pytest.mark.parametrize("name,kw", MATRIX, ids=MATRIX_IDS)
def test_shared_prefill_equals_end_to_end(models, smol_tokenizer, name, kw):
    """`kvforge eval` compresses forks of one recorded prefill: merges must not touch the shared buffers."""
    model, tok = models["llama"], smol_tokenizer
    press = get_press(name, compression_ratio=0.5, **kw)
    enc = encode(model, tok, [CONTEXT], [QUESTIONS[:1]], max_new_tokens=4)
    full = prefill_context(model, enc, None, 4, record=True)
    before = [layer.values.clone() for layer in full.layers]
    shared = answer(model, tok, compress_prefilled(full, press, model, enc), enc, 4)
    assert shared == answer(model, tok, prefill_context(model, enc, press, 4), enc, 4)
    assert all(torch.equal(layer.values, v) for layer, v in zip(full.layers, before))


def test_wrapper_specs_name_the_inner_press():
    assert parse_press("merge:snapkv")(0.5).press.name == "snapkv"
    assert parse_press("chunk:knorm")(0.5).press.name == "knorm"


# -- engine addition: replace_entries ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [DenseLayer, HeadVarlenLayer])
def test_replace_entries_writes_new_buffers(cls):
    layer = cls(reserve=2)
    k = torch.randn(1, 2, 5, 4)
    layer.update(k, -k)
    if cls is HeadVarlenLayer:
        layer.keep_mask(torch.tensor([[[True, False, True, True, False], [True, True, False, False, False]]]))
    else:
        layer.keep(torch.tensor([[[0, 2, 3], [0, 1, 2]]]))
    state, slots, counts = layer.snapshot(), layer.entry_slots().clone(), layer.entry_counts()
    old_values = layer.values.clone()
    layer.replace_entries(values=layer.values + 1)
    torch.testing.assert_close(layer.values, old_values + 1)
    assert torch.equal(layer.entry_slots(), slots) and layer.entry_counts() == counts
    layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))  # decoding still appends
    assert layer.n == 4
    layer.restore(state)  # the snapshot still sees the old buffers
    torch.testing.assert_close(layer.values, old_values)


# -- query-aware ---------------------------------------------------------------------------------------------------

def test_query_aware_window_covers_the_question(models, smol_tokenizer):
    model, tok = models["llama"], smol_tokenizer
    ctx_ids, q_ids = encode_prompt(tok, CONTEXT, QUESTIONS[0])
    n_ctx, n_q, w = len(ctx_ids), len(q_ids), 8
    assert n_q >= w
    press = get_press("snapkv", window_size=w, compression_ratio=0.75)
    _, agnostic = generate(model, tok, CONTEXT, QUESTIONS[:1], press=press, max_new_tokens=4, return_cache=True)
    _, aware = generate(model, tok, CONTEXT, QUESTIONS[:1], press=press, max_new_tokens=4, return_cache=True,
                        query_aware=True)
    for i in agnostic.compressible_layers():
        before = kept_slots(agnostic.layers[i], 0, 0)
        after = [s for s in kept_slots(aware.layers[i], 0, 0) if s < n_ctx + n_q]  # drop generated tokens
        assert len(before) == int(n_ctx * 0.25) and max(before) < n_ctx  # question never compressed
        assert len(after) == int((n_ctx + n_q) * 0.25)  # the question is compressed with the context ...
        assert set(range(n_ctx + n_q - w, n_ctx + n_q)) <= set(after)  # ... and the window is the question
        assert set(after) & set(range(n_ctx)) != set(before)  # so another part of the context is kept


def test_query_aware_snapkv_keeps_the_needle_the_agnostic_window_loses():
    n_ctx, n_q, w, needle, distractor = 24, 8, 8, 5, 2
    basis = orthonormal(16, seed=5)
    g = torch.Generator().manual_seed(5)
    keys = (torch.randn(n_ctx + n_q, 14, generator=g) @ basis[2:])[None, None].repeat(1, H_KV, 1, 1)
    keys[:, :, needle], keys[:, :, distractor] = basis[0], basis[1]  # the only keys along basis 0 and 1
    query = 0.1 * torch.randn(1, H_KV * G, n_ctx + n_q, D, generator=g)
    query[:, :, n_ctx - w : n_ctx] += 20 * basis[1]  # the context's end looks at the distractor
    query[:, :, n_ctx:] += 20 * basis[0]  # the question looks at the needle
    values = torch.randn(1, H_KV, n_ctx + n_q, D, generator=g)
    press = get_press("snapkv", window_size=w, kernel_size=1, compression_ratio=0.625)
    agnostic = make_ctx(keys[:, :, :n_ctx].clone(), values[:, :, :n_ctx].clone(), query[:, :, :n_ctx])
    press.compress(agnostic)
    aware = make_ctx(keys.clone(), values.clone(), query)
    press.compress(aware)
    assert needle not in kept_slots(agnostic.cache.layers[0]) and distractor in kept_slots(agnostic.cache.layers[0])
    assert needle in kept_slots(aware.cache.layers[0])


def test_query_aware_batch_equals_alone_and_no_press_is_plain(models, smol_tokenizer):
    model, tok = models["llama"], smol_tokenizer
    press = get_press("snapkv", window_size=8, compression_ratio=0.6)
    batch = generate(model, tok, CONTEXTS, QUESTIONS, press=press, max_new_tokens=5, query_aware=True)
    assert batch == [generate(model, tok, c, QUESTIONS, press=press, max_new_tokens=5, query_aware=True)
                     for c in CONTEXTS]
    assert generate(model, tok, CONTEXT, QUESTIONS, max_new_tokens=5, query_aware=True) == generate(
        model, tok, CONTEXT, QUESTIONS, max_new_tokens=5)
    with pytest.raises(KVForgeError, match="query_aware"):
        generate(model, tok, CONTEXT, QUESTIONS[:1], press=Hooked(), max_new_tokens=2, query_aware=True)


def test_query_aware_in_eval_and_cli(tmp_path, models, smol_tokenizer):
    out = run_eval("tiny-llama", ["niah_single_1"], ["snapkv"], [0.5], 300, 1, tmp_path, max_new_tokens=4,
                   model=models["llama"], tokenizer=smol_tokenizer, progress=False, query_aware=True)
    assert json.loads((out / "run_meta.json").read_text())["args"]["query_aware"] is True
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["press"] for r in rows} == {"none", "snapkv"}
    args = build_parser().parse_args(["eval", "--tasks", "niah_single_1", "--presses", "snapkv", "--out", "x",
                                      "--query-aware"])
    assert args.query_aware is True
