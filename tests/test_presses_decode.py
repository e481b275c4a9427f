"""Decode-time presses: H2O, TOVA (decode), Scissorhands, the DecodingPress wrapper, and Quest's page selection.

Unit tests drive one cache layer by hand with constructed keys and queries (scaling 1, one-hot keys, so a
query's logits over the entries are exactly what the test writes); end-to-end tests run the tiny models."""

from types import SimpleNamespace

import pytest
import torch
from helpers import CONTEXT, QUESTIONS

from kvforge import KVCache, generate, get_press
from kvforge.cache import DenseLayer, HeadVarlenLayer
from kvforge.generate import encode_prompt
from kvforge.models import tiny_model
from kvforge.presses.base import LayerContext
from kvforge.presses.decoding import evict

CONTEXTS = [CONTEXT, "A short note about the mill, the river and the bees."]
D = 16


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("llama", "gemma3")}


# -- a one-layer cache driven by hand ------------------------------------------------------------------------
class Layer:
    """One compressible layer; `prefill`/`step` append entries and run the press as the attention function does."""

    def __init__(self, press, h_kv=1):
        config = SimpleNamespace(model_type="llama", num_hidden_layers=1, sliding_window=None, layer_types=None)
        self.cache = KVCache(config, press=press, reserve=8)
        self.press, self.h = press, h_kv

    @property
    def layer(self):
        return self.cache.layers[0]

    def ctx(self, query):
        return LayerContext(None, self.cache, 0, query, None, 1.0)

    def append(self, keys):
        self.layer.update(keys, keys.clone())

    def prefill(self, keys, queries):
        self.append(keys)
        self.press.compress(self.ctx(queries))

    def step(self, key, query):
        self.append(key)
        ctx = self.ctx(query)
        chosen = self.press.select(ctx) if hasattr(self.press, "select") else None
        if hasattr(self.press, "on_decode"):
            self.press.on_decode(ctx)
        return chosen

    def slots(self, head=0):
        s = self.layer.entry_slots()
        return list(range(self.layer.n)) if s is None else s[0, head].tolist()


def onehot(tokens, h=1):
    """Keys `[1, h, len, D]`: token t's key is e_t."""
    k = torch.zeros(1, h, len(tokens), D)
    for i, t in enumerate(tokens):
        k[0, :, i, t] = 1.0
    return k


def logits(rows, hq=1):
    """Queries `[1, hq, len(rows), D]` whose logits over one-hot keys are the given {token: logit} dicts."""
    q = torch.zeros(1, hq, len(rows), D)
    for i, row in enumerate(rows):
        for t, v in row.items():
            q[0, :, i, t] = v
    return q


# -- defining behaviours ---------------------------------------------------------------------------------------
def test_h2o_keeps_heavy_hitters_and_recent_window_with_accumulators_following_entries():
    t = Layer(get_press("h2o", budget=4))  # 2 heavy hitters + 2 recent
    # token 1 is attended by queries 1..5, token 3 by queries 6 and 7 only (the last query prefers token 3)
    t.prefill(onehot(range(8)), logits([{1: 20}] * 6 + [{3: 20}] * 2))
    assert t.slots() == [1, 3, 6, 7]  # heavy: 1 (~5), 3 (~2); recent: 6, 7
    torch.testing.assert_close(t.layer.press_state["acc"][0, 0], torch.tensor([5.0, 2.0, 0.0, 0.0]), atol=1e-4,
                               rtol=0)
    t.step(onehot([8]), logits([{3: 20}]))  # token 3 gains one more; the recent window moves to 7, 8
    assert t.slots() == [1, 3, 7, 8] and t.layer.n == 4
    t.step(onehot([9]), logits([{}]))  # uniform: 0.2 each
    assert t.slots() == [1, 3, 8, 9] and t.layer.n == 4
    torch.testing.assert_close(t.layer.press_state["acc"][0, 0], torch.tensor([5.2, 3.2, 0.2, 0.2]), atol=1e-4,
                               rtol=0)


def test_tova_decode_evicts_least_attended_by_newest_query_averaged_over_heads():
    t = Layer(get_press("tova_decode", budget=4), h_kv=2)
    t.prefill(onehot(range(4), h=2), logits([{0: 20}] * 4, hq=4))  # earlier queries all attend token 0
    assert t.slots(0) == [0, 1, 2, 3]  # at the budget: nothing evicted yet
    q = logits([{0: 2, 1: 4, 2: 4, 4: 4}], hq=4)  # query heads 0, 1 (KV head 0): token 3 least attended
    q[0, 2:] = logits([{1: 4, 2: 4, 3: 6, 4: 4}])[0, 0]  # query heads 2, 3 (KV head 1): token 0 least attended
    t.step(onehot([4], h=2), q)  # head average: token 0 lowest (0.022 vs 0.21 / 0.36)
    assert isinstance(t.layer, DenseLayer) and type(t.layer) is DenseLayer  # one eviction shared by all heads
    assert t.slots(0) == t.slots(1) == [1, 2, 3, 4]


def test_scissorhands_keeps_persistently_important_tokens_within_the_history_window():
    t = Layer(get_press("scissorhands", budget=2, history_window=3, recent_window=1))
    # q0, q1 attend token 0 (outside the 3-query window); q2, q3 give token 1 more than the average 1/t (0.45,
    # 0.36) without being dominant; q4 attends token 2 (1.0): summed over the window token 2 (1.49) beats
    # token 1 (0.81), and the newest query prefers token 2, but token 1 was important twice, token 2 once.
    t.prefill(onehot(range(5)), logits([{}, {0: 10}, {1: 0.5}, {1: 0.5}, {2: 10}]))
    assert t.slots() == [1, 4]  # token 4: the recent window
    assert t.layer.press_state["count"][0, 0].tolist() == [2, 0]
    t.step(onehot([5]), logits([{5: 10}]))  # window q3, q4, q5: token 1 still counts once, token 4 never
    assert t.slots() == [1, 5]
    t.step(onehot([6]), logits([{6: 10}]))  # q3 leaves the window: token 1 counts 0, token 5 counts 1
    assert t.slots() == [5, 6]


def test_decoding_press_compresses_every_n_steps_to_target():
    t = Layer(get_press("decoding", target_size=4, compression_interval=3))  # knorm: lowest key norms kept
    norms = [5.0, 1.0, 7.0, 2.0, 3.0, 9.0, 0.5, 4.0, 6.0, 8.0]
    keys = onehot(range(10)) * torch.tensor(norms)[None, None, :, None]
    t.prefill(keys[:, :, :4], logits([{}] * 4))
    sizes = []
    for i in range(4, 10):
        t.step(keys[:, :, i : i + 1], logits([{}]))
        sizes.append(t.layer.n)
        if i == 6:
            assert t.slots() == [1, 3, 4, 6]  # the 4 lowest norms of tokens 0..6
    assert sizes == [5, 6, 4, 5, 6, 4]


def test_decoding_press_gives_a_window_scorer_the_buffered_queries():
    snap = get_press("snapkv", window_size=2, kernel_size=1)
    t = Layer(get_press("decoding", press=snap, target_size=3, compression_interval=2))
    t.prefill(onehot(range(3)), logits([{}] * 3))
    t.step(onehot([3]), logits([{0: 10}]))  # step 1 attends token 0
    t.step(onehot([4]), logits([{1: 3}]))  # step 2 prefers token 1 (0.83): the newest query alone keeps 1
    assert t.slots() == [0, 3, 4]  # the two buffered queries: token 0 (1.04) > token 1 (0.83); window kept


def test_quest_selects_the_page_with_the_highest_upper_bound():
    quest = get_press("quest", token_budget=8, page_size=4, skip_layers=0)  # 2 pages: best + newest
    t = Layer(quest)
    keys = torch.zeros(1, 1, 13, D)
    keys[0, 0, 0, 0] = keys[0, 0, 1, 1] = 5.0  # page 0: no key reaches q·k = 10, but its bound is 5 + 5
    keys[0, 0, 4:8, :2] = 4.0  # page 1: every key gives q·k = 8 (the exact best key and the best mean)
    t.prefill(keys[:, :, :12], logits([{}] * 12))  # pages 0-2 complete
    q = logits([{0: 1, 1: 1}])
    chosen = t.step(keys[:, :, 12:], q)  # page 3: one entry, the newest
    assert chosen[0, 0].tolist() == [True] * 4 + [False] * 8 + [True]
    assert t.layer.n == 13  # nothing evicted


def test_quest_aggregates_a_group_with_max():
    t = Layer(get_press("quest", token_budget=8, page_size=4, skip_layers=0))
    keys = torch.zeros(1, 1, 9, D)
    keys[0, 0, 0:4, 0], keys[0, 0, 0:4, 1] = 3.0, -10.0  # page 0: head A bound 3, head B -10 (mean -3.5)
    keys[0, 0, 4:8, 0:2] = 1.0  # page 1: both heads 1
    t.prefill(keys[:, :, :8], logits([{}] * 8, hq=2))
    q = torch.zeros(1, 2, 1, D)
    q[0, 0, 0, 0] = q[0, 1, 0, 1] = 1.0
    chosen = t.step(keys[:, :, 8:], q)
    assert chosen[0, 0].tolist() == [True] * 4 + [False] * 4 + [True]


def test_quest_updates_page_bounds_as_decoding_completes_pages():
    quest = get_press("quest", token_budget=8, page_size=4, skip_layers=0)
    t = Layer(quest)
    t.prefill(torch.full((1, 1, 8, D), 0.1), logits([{}] * 8))
    assert t.layer.press_state["pages"] == 2
    q = logits([{0: 1}])
    new = torch.full((1, 1, 5, D), 0.1)
    new[0, 0, 2, 0] = 50.0  # inside page 2, which decoding fills
    for i in range(5):
        chosen = t.step(new[:, :, i : i + 1], q)
    assert t.layer.press_state["pages"] == 3  # page 2 completed during decoding, its bounds saved
    assert chosen[0, 0].tolist() == [False] * 8 + [True] * 5  # page 2 (bound 50) + page 3 (newest)
    stats = quest.stats()
    assert stats["layer_steps"] == 5 and stats["entries_attended"] < stats["entries_stored"]
    assert stats["kv_bytes_read"] == stats["entries_attended"] * 2 * D * 4


def test_evict_hides_real_filler_when_a_row_lacks_padding():
    """Rows keeping different counts with no padding to fill with: the layer turns head-varlen and hides the
    extra entry, so each row attends exactly what it keeps; per-entry state follows the entries."""
    t = Layer(get_press("h2o", budget=4))
    t.append(torch.randn(2, 1, 4, D))
    ctx = t.ctx(torch.randn(2, 1, 1, D))
    keep = torch.tensor([[[True, False, False, True]], [[False, True, True, True]]])
    tag = torch.arange(8.0).view(2, 1, 4)
    out = evict(ctx, keep, {"tag": tag})
    assert type(t.layer) is HeadVarlenLayer and t.layer.n == 3
    assert t.layer.entry_counts() == [5]  # 2 + 3 visible entries over the batch
    valid, slots = t.layer.entry_valid(), t.layer.entry_slots()
    assert slots[0, 0][valid[0, 0]].tolist() == [0, 3] and slots[1, 0][valid[1, 0]].tolist() == [1, 2, 3]
    assert out["tag"][1, 0].tolist() == [5.0, 6.0, 7.0] and out["tag"][0, 0][valid[0, 0]].tolist() == [0.0, 3.0]


# -- end to end ----------------------------------------------------------------------------------------------
def greedy(model, ids, press, steps=512, after_step=None):
    """Prefill `ids` into a new KVCache with `press`, then decode `steps` tokens greedily (no EOS stop), calling
    `after_step(cache)` after the prefill and after every decoding step. Returns the cache."""
    cache = KVCache(model, press=press)
    with torch.inference_mode():
        out = model(ids, past_key_values=cache, logits_to_keep=1)
        for _ in range(steps):
            if after_step is not None:
                after_step(cache)
            out = model(out.logits[:, -1].argmax(-1, keepdim=True), past_key_values=cache, logits_to_keep=1)
    if after_step is not None:
        after_step(cache)
    return cache


@pytest.mark.parametrize("name, options, bound", [
    ("h2o", dict(budget=32), 32),
    ("tova_decode", dict(budget=32), 32),
    ("scissorhands", dict(budget=32, history_window=16, recent_window=8, drop_amount=4), 32),
    ("decoding", dict(target_size=32, compression_interval=8), 32 + 8),
])
def test_decode_presses_hold_the_budget_for_512_tokens(models, smol_tokenizer, one_thread, name, options, bound):
    model, tok = models["llama"], smol_tokenizer
    ids = torch.tensor([sum(encode_prompt(tok, CONTEXT, QUESTIONS[0]), [])])
    assert ids.shape[1] > 2 * bound
    sizes = []
    cache = greedy(model, ids, get_press(name, **options),
                   after_step=lambda c: sizes.append([c.layers[i].n for i in c.compressible_layers()]))
    assert len(sizes) == 513 and max(max(s) for s in sizes) <= bound
    assert min(min(s) for s in sizes[1:]) >= bound - 8  # it holds close to the budget, not far below
    assert all(cache.layers[i].get_seq_length() == ids.shape[1] + 512 for i in cache.compressible_layers())


def test_quest_attends_at_most_its_budget_for_512_tokens(models, smol_tokenizer, one_thread):
    model, tok = models["llama"], smol_tokenizer
    ids = torch.tensor([sum(encode_prompt(tok, CONTEXT, QUESTIONS[0]), [])])
    quest = get_press("quest", token_budget=64, skip_layers=0)
    attended = []
    select = quest.select

    def spy(ctx):
        chosen = select(ctx)
        attended.append(int(ctx.real.sum(-1).max() if chosen is None else chosen.sum(-1).max()))
        return chosen

    quest.select = spy
    cache = greedy(model, ids, quest)
    assert len(attended) == 512 * len(cache.compressible_layers()) and max(attended) <= 64
    assert cache.layers[0].n == ids.shape[1] + 512  # nothing evicted
    assert quest.stats()["fraction_attended"] < 0.25


BATCH_PRESSES = {
    "h2o": dict(compression_ratio=0.5),
    "tova_decode": dict(compression_ratio=0.5),
    "scissorhands": dict(compression_ratio=0.5, history_window=8, recent_window=8, drop_amount=2),
    "decoding": dict(target_size=24, compression_interval=4),
    "quest": dict(token_budget=32, skip_layers=0),
}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", list(BATCH_PRESSES))
def test_batch_equals_each_context_alone(models, smol_tokenizer, one_thread, family, name):
    model, tok = models[family], smol_tokenizer
    press = get_press(name, **BATCH_PRESSES[name])
    batch = generate(model, tok, CONTEXTS, QUESTIONS, press=press, max_new_tokens=8)
    assert batch == [generate(model, tok, c, QUESTIONS, press=press, max_new_tokens=8) for c in CONTEXTS]


@pytest.mark.parametrize("name", ["h2o", "scissorhands", "decoding"])
def test_two_questions_equal_each_alone(models, smol_tokenizer, one_thread, name):
    """The press state is snapshotted with the cache: the second question starts where the first did."""
    model, tok = models["llama"], smol_tokenizer
    press = get_press(name, **BATCH_PRESSES[name])
    both = generate(model, tok, CONTEXT, QUESTIONS, press=press, max_new_tokens=12)
    assert both == [generate(model, tok, CONTEXT, [q], press=press, max_new_tokens=12)[0] for q in QUESTIONS]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quest_with_budget_over_every_entry_equals_no_press(models, smol_tokenizer, one_thread, family):
    model, tok = models[family], smol_tokenizer
    quest = get_press("quest", token_budget=4096, skip_layers=0)
    got = generate(model, tok, CONTEXTS, QUESTIONS, press=quest, max_new_tokens=16)
    assert got == generate(model, tok, CONTEXTS, QUESTIONS, press=None, max_new_tokens=16)
    assert quest.stats()["fraction_attended"] == 1.0 and quest.stats()["layer_steps"] > 0
