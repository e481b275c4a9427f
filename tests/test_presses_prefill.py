"""Prefill presses: observed_attention, tova, l2norm, expected_attention, nacl, headkv (+ headkv-scores).

Each press is checked on constructed inputs for the behaviour that defines it, against slow references
written here with plain loops where a formula is involved, and end to end: a batch of contexts through
`generate` equals each context alone on two families.
"""

import json
import math
import sys

import pytest
import torch
from helpers import CONTEXTS, QUESTIONS
from transformers import LlamaConfig

from kvforge import KVForgeError, generate, get_press
from kvforge.cache import KVCache
from kvforge.calibrate.headkv import _answer_token_positions, head_scores
from kvforge.cli import main
from kvforge.generate import encode_prompt
from kvforge.models import tiny_model
from kvforge.presses.base import LayerContext
from kvforge.presses.expected_attention import query_statistics
from kvforge.presses.headkv import HeadKVPress
from kvforge.presses.knorm import KnormPress
from kvforge.presses.nacl import NaClPress
from kvforge.presses.observed_attention import ObservedAttentionPress
from kvforge.presses.snapkv import SnapKVPress
from kvforge.presses.tova import TOVAPress, tova_scores

NEW = ["observed_attention", "tova", "l2norm", "expected_attention", "nacl", "headkv"]


# ---------------------------------------------------------------------------------------------------------
# constructed layer contexts
# ---------------------------------------------------------------------------------------------------------
def make_ctx(query, keys, values=None, key_real=None, module=None, layer_idx=0, layers=1, scaling=None):
    """A real LayerContext over a KVCache holding `keys`/`values` `[B, H, n, D]` in every layer.

    `key_real [B, n]` marks real tokens (left padding); the mask is causal & real, as transformers builds it.
    """
    b, hq, q, d = query.shape
    h, n = keys.shape[1], keys.shape[2]
    cfg = LlamaConfig(num_hidden_layers=layers, num_attention_heads=hq, num_key_value_heads=h, hidden_size=hq * d,
                      head_dim=d, vocab_size=8)
    cache = KVCache(cfg)
    values = keys.clone() if values is None else values
    for i in range(layers):
        cache.layers[i].update(keys.clone(), values.clone())
    mask = None
    if key_real is not None:
        pos = torch.arange(n, device=key_real.device)
        causal = pos[None, :] <= pos[n - q :, None]
        mask = causal[None, None] & key_real[:, None, None, :]
    return LayerContext(module, cache, layer_idx, query, mask, scaling)


def kept(ctx) -> list[list[set[int]]]:
    """Kept logical slots per row and KV head."""
    layer = ctx.cache.layers[ctx.layer_idx]
    b, h, n = layer.keys.shape[:3]
    slots = layer.entry_slots()
    slots = torch.arange(n).expand(b, h, n) if slots is None else slots
    valid = layer.entry_valid()
    valid = torch.ones(b, h, n, dtype=torch.bool) if valid is None else valid
    return [[set(slots[i, j][valid[i, j]].tolist()) for j in range(h)] for i in range(b)]


def padded(n: int, pads: list[int]) -> torch.Tensor:
    return torch.stack([torch.arange(n) >= p for p in pads])


# ---------------------------------------------------------------------------------------------------------
# observed_attention
# ---------------------------------------------------------------------------------------------------------
def reference_observed(query, keys, key_real, normalize, scale):
    b, hq, q, d = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(hq):
            recv, seen = [0.0] * n, [0] * n
            for i in range(q):
                pos = n - q + i
                js = [j for j in range(pos + 1) if key_real[bi, j]]
                if not key_real[bi, pos] or not js:
                    continue
                logits = [float(query[bi, hi, i] @ keys[bi, hi // g, j]) * scale for j in js]
                top = max(logits)
                z = sum(math.exp(x - top) for x in logits)
                for j, x in zip(js, logits):
                    recv[j] += math.exp(x - top) / z
                    seen[j] += 1
            for j in range(n):
                val = recv[j] / max(seen[j], 1) if normalize else recv[j]
                out[bi, hi // g, j] += val / g
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_observed_attention_matches_loop_reference_with_padding_and_chunks(normalize):
    g = torch.Generator().manual_seed(1)
    b, h, grp, n, d = 2, 2, 2, 9, 4
    query = torch.randn(b, h * grp, n, d, generator=g)
    keys = torch.randn(b, h, n, d, generator=g)
    real = padded(n, [0, 3])
    ctx = make_ctx(query, keys, key_real=real)
    press = ObservedAttentionPress(normalize=normalize, query_chunk=2)  # several chunks
    got = press.score(ctx)
    ref = reference_observed(query, keys, real, normalize, d**-0.5)
    mask = real[:, None].expand(b, h, n)
    torch.testing.assert_close(got[mask].double(), ref[mask], rtol=1e-5, atol=1e-6)


def test_observed_attention_keeps_heavy_hitter_that_last_query_ignores():
    # queries 1..4 attend entry 1 heavily; the last query attends entry 2 (what TOVA would keep)
    keys = torch.zeros(1, 1, 6, 2)
    keys[0, 0, 1] = torch.tensor([4.0, 0.0])
    keys[0, 0, 2] = torch.tensor([0.0, 4.0])
    query = torch.tensor([1.0, 0.0]).repeat(1, 1, 6, 1)
    query[0, 0, 5] = torch.tensor([0.0, 1.0])
    ctx = make_ctx(query, keys, scaling=1.0)
    ObservedAttentionPress(budget=2).compress(ctx)
    assert 1 in kept(ctx)[0][0]
    ctx = make_ctx(query, keys, scaling=1.0)
    TOVAPress(budget=2).compress(ctx)
    assert kept(ctx)[0][0] == {2, 5}  # the last query's favourite + the newest token


# ---------------------------------------------------------------------------------------------------------
# tova
# ---------------------------------------------------------------------------------------------------------
def tova_inputs():
    keys = torch.zeros(1, 2, 6, 2)
    keys[0, 0, 1] = torch.tensor([4.0, 0.0])  # KV head 0: entry 1
    keys[0, 1, 3] = torch.tensor([4.0, 0.0])  # KV head 1: entry 3
    keys[0, :, 5] = torch.tensor([-4.0, 0.0])  # the newest entry gets ~no attention
    query = torch.zeros(1, 4, 6, 2)
    query[0, :2, -1] = torch.tensor([2.0, 0.0])  # query heads of KV head 0: sharp
    query[0, 2:, -1] = torch.tensor([0.5, 0.0])  # query heads of KV head 1: mild
    return query, keys


def test_tova_head_average_over_layer_and_group_and_keeps_last():
    query, keys = tova_inputs()
    ctx = make_ctx(query, keys, scaling=1.0)
    TOVAPress(budget=2).compress(ctx)
    assert kept(ctx)[0] == [{1, 5}, {1, 5}]  # one decision for the whole layer (the paper)
    ctx = make_ctx(query, keys, scaling=1.0)
    TOVAPress(budget=2, head_average="group").compress(ctx)
    assert kept(ctx)[0] == [{1, 5}, {3, 5}]


def test_tova_scores_are_last_query_attention_mean_over_heads():
    g = torch.Generator().manual_seed(2)
    query, keys = torch.randn(1, 4, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    ctx = make_ctx(query, keys)
    probs = torch.softmax(torch.einsum("hd,hnd->hn", query[0, :, -1], keys[0].repeat_interleave(2, 0)) / 8**0.5, -1)
    got = tova_scores(ctx)
    assert torch.isinf(got[..., -1]).all()
    torch.testing.assert_close(got[0, :, :-1], probs.mean(0)[None, :-1].expand(2, 6))
    torch.testing.assert_close(tova_scores(ctx, "group", keep_last=False)[0], probs.view(2, 2, 7).mean(1))


# ---------------------------------------------------------------------------------------------------------
# l2norm
# ---------------------------------------------------------------------------------------------------------
def test_l2norm_is_knorm_keeps_lowest_key_norms():
    norms = torch.tensor([[3.0, 1.0, 2.0, 0.5, 4.0, 1.5], [0.1, 5.0, 0.2, 6.0, 0.3, 7.0]])
    keys = torch.zeros(1, 2, 6, 4)
    keys[0, :, :, 0] = norms
    press = get_press("l2norm", budget=3)
    assert isinstance(press, KnormPress) and press.name == "l2norm"
    ctx = make_ctx(torch.randn(1, 2, 6, 4), keys)
    press.compress(ctx)
    assert kept(ctx)[0] == [{1, 3, 5}, {0, 2, 4}]
    ctx2 = make_ctx(torch.randn(1, 2, 6, 4), keys)
    get_press("knorm", budget=3).compress(ctx2)
    assert kept(ctx2) == kept(ctx)


# ---------------------------------------------------------------------------------------------------------
# expected_attention
# ---------------------------------------------------------------------------------------------------------
def reference_expected(query, keys, values, key_real, n_sink, scale, eps=0.0, window=None):
    """No RoPE: Gaussian fit of the real queries after the sinks, E[exp] logits, group mean, × ‖v‖."""
    b, hq, q, d = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    out = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        pos = (key_real[bi].long().cumsum(0) - 1).tolist()
        first = n_sink if window is None else max(n_sink, int(key_real[bi].sum()) - window)
        use = [i for i in range(q) if key_real[bi, i] and pos[i] >= first]
        cand = [j for j in range(n) if key_real[bi, j] and pos[j] >= n_sink]
        for hi in range(hq):
            qs = query[bi, hi, use].double()
            mu = qs.mean(0)
            cov = (qs - mu).T @ (qs - mu) / len(use)
            kk = keys[bi, hi // g].double()
            logits = torch.tensor([float(mu @ kk[j]) * scale + float(kk[j] @ cov @ kk[j]) * scale**2 / 2 for j in cand])
            p = torch.softmax(logits, 0)
            for j, pj in zip(cand, p.tolist()):
                out[bi, hi // g, j] += pj / g
        vn = values[bi].double().norm(dim=-1)
        out[bi] = (out[bi] + eps) * vn
        for j in range(n):
            if key_real[bi, j] and pos[j] < n_sink:
                out[bi, :, j] = float("inf")
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_expected_attention_matches_gaussian_reference_without_rope(window):
    g = torch.Generator().manual_seed(3)
    b, h, grp, n, d = 2, 2, 2, 12, 4
    query = torch.randn(b, h * grp, n, d, generator=g)
    keys, values = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    real = padded(n, [0, 4])
    ctx = make_ctx(query, keys, values, key_real=real)
    got = get_press("expected_attention", epsilon=0.01, stat_window=window).score(ctx)
    ref = reference_expected(query, keys, values, real, 4, d**-0.5, eps=0.01, window=window)
    mask = real[:, None].expand(b, h, n)
    torch.testing.assert_close(got[mask].double(), ref[mask], rtol=1e-4, atol=1e-6)


def test_expected_attention_prefers_aligned_keys_large_values_and_query_variance():
    d, n = 3, 10
    e1, e2, e3 = torch.eye(d)
    query = torch.zeros(1, 1, n, d)
    query[0, 0, :] = e1 * 0.5
    query[0, 0, 4::2] += e2 * 3.0  # queries vary along e2, never along e3
    query[0, 0, 5::2] -= e2 * 3.0
    keys, values = torch.zeros(1, 1, n, d), torch.ones(1, 1, n, d)
    keys[0, 0, 4], keys[0, 0, 5] = e1 * 2, -e1 * 2  # aligned / anti-aligned with the mean query
    keys[0, 0, 6], keys[0, 0, 7] = e2 * 2, e3 * 2  # high- / zero-variance direction (mean logit 0 for both)
    values[0, 0, 9] *= 10  # entry 9: like entry 8 (zero key) but a large value
    s = get_press("expected_attention").score(make_ctx(query, keys, values, scaling=1.0))[0, 0]
    assert torch.isinf(s[:4]).all()  # sinks
    assert s[4] > s[5] and s[6] > s[7] and s[9] > 5 * s[8]
    s = get_press("expected_attention", use_covariance=False).score(make_ctx(query, keys, values, scaling=1.0))[0, 0]
    torch.testing.assert_close(s[6], s[7])  # without the covariance term the variance direction is invisible


@pytest.mark.parametrize("family,layer", [("llama", 0), ("phi3", 1), ("gemma3", 2), ("cohere", 0), ("glm4", 1),
                                          ("helium", 1), ("smollm3", 3), ("cohere2", 3), ("exaone4", 3)])
def test_expected_attention_undoes_and_averages_the_model_rope(family, layer):
    """Queries that are one fixed pre-RoPE vector rotated by the model's own RoPE at positions 0..n-1:
    the statistics must give mean = average over the next F positions of that vector rotated by the
    model's RoPE, and zero covariance (Phi3: partial rotary; Gemma3: the global layers' RoPE; Cohere: interleaved
    pairs; GLM-4: interleaved on half the channels; SmolLM3's layer 3 and Cohere 2's global layer: no RoPE)."""
    model = tiny_model(family)
    attn = model.model.layers[layer].self_attn
    modeling = sys.modules[type(attn).__module__]
    hq, hkv, d = model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim
    # the model's own switches for a layer without RoPE
    nope = (not getattr(attn, "use_rope", True) or (family == "cohere2" and attn.sliding_window is None)
            or (family == "exaone4" and not attn.is_sliding))
    n, future = 11, 7
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, hq, 1, d, generator=g)

    def rope(positions):
        x = base.expand(1, hq, len(positions), d)
        if nope:
            return x
        args = (x, torch.tensor([positions]))
        extra = (attn.layer_type,) if family == "gemma3" else ()
        cos, sin = model.model.rotary_emb(*args, *extra)
        return modeling.apply_rotary_pos_emb(x, x, cos, sin)[0]

    query = rope(list(range(n)))
    ctx = make_ctx(query, torch.randn(1, hkv, n, d, generator=g), module=attn)
    mu, cov = query_statistics(ctx, n_sink=2, n_future=future, use_covariance=True)
    torch.testing.assert_close(mu, rope(list(range(n, n + future))).mean(2), rtol=1e-4, atol=1e-4)
    assert cov.abs().max() < 1e-4
    # the rotation did something (nothing on a NoPE layer)
    assert torch.allclose(mu, base[:, :, 0], atol=1e-2) == nope


# ---------------------------------------------------------------------------------------------------------
# nacl
# ---------------------------------------------------------------------------------------------------------
def nacl_inputs(n=20, target=10, other=7, n_proxy=2):
    """The last `n_proxy` queries (the proxies) attend `target`; every other query attends `other`."""
    d = 4
    keys = torch.zeros(1, 1, n, d)
    keys[0, 0, target] = torch.tensor([0.0, 6.0, 0.0, 0.0])
    keys[0, 0, other] = torch.tensor([6.0, 0.0, 0.0, 0.0])
    query = torch.zeros(1, 1, n, d)
    query[0, 0, :, 0] = 1.0
    query[0, 0, -n_proxy:] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    return query, keys


def test_nacl_keeps_sinks_proxies_and_proxy_attended_tokens():
    query, keys = nacl_inputs()
    ctx = make_ctx(query, keys, scaling=1.0)
    NaClPress(budget=7, proxy_ratio=0.1, random_fraction=0.0).compress(ctx)
    assert kept(ctx)[0][0] == {0, 1, 2, 3, 10, 18, 19}  # 4 sinks, 2 proxies, the proxies' choice (not 7)


def test_nacl_random_part_is_seeded_and_follows_proxy_scores():
    query, keys = nacl_inputs(n_proxy=4)
    protected = {0, 1, 2, 3, 16, 17, 18, 19}
    picks = []
    for seed in range(60):
        sets = []
        for _ in range(2):
            ctx = make_ctx(query, keys, scaling=1.0)
            NaClPress(budget=10, proxy_ratio=0.2, random_fraction=1.0, seed=seed).compress(ctx)
            sets.append(kept(ctx)[0][0])
        assert sets[0] == sets[1]  # same seed, same selection
        assert protected <= sets[0]
        picks.append(frozenset(sets[0] - protected))
    assert all(len(p) == 2 for p in picks) and len(set(picks)) > 10  # seeds differ
    hits = {j: sum(j in p for p in picks) for j in range(4, 16)}
    # sampled ∝ softmax(proxy score): entry 10 (score ≈ 4, summed over 4 proxies) ~e⁴ times likelier than
    # any other entry (uniform sampling would pick each ~10 times)
    assert hits[10] > 4 * max(v for j, v in hits.items() if j != 10)


def test_nacl_row_keeps_the_same_tokens_alone_and_padded():
    g = torch.Generator().manual_seed(5)
    n, pad = 24, 5
    q1, k1 = torch.randn(1, 2, n - pad, 4, generator=g), torch.randn(1, 1, n - pad, 4, generator=g)
    press = NaClPress(compression_ratio=0.5, proxy_ratio=0.1, random_fraction=0.5, seed=3)
    alone = make_ctx(q1, k1)
    press.compress(alone)
    other_q, other_k = torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 1, n, 4, generator=g)
    query = torch.cat([other_q, torch.cat([torch.zeros(1, 2, pad, 4), q1], 2)])
    keys = torch.cat([other_k, torch.cat([torch.zeros(1, 1, pad, 4), k1], 2)])
    batch = make_ctx(query, keys, key_real=padded(n, [0, pad]))
    press.compress(batch)
    real_kept = {s - pad for s in kept(batch)[1][0] if s >= pad}  # the rest is padding filling the dense layer
    assert real_kept == kept(alone)[0][0] and len(real_kept) == (n - pad) // 2


# ---------------------------------------------------------------------------------------------------------
# headkv
# ---------------------------------------------------------------------------------------------------------
def write_scores(tmp_path, scores, name="scores.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"scores": scores}))
    return str(path)


def random_ctx(b=1, h=2, grp=2, n=60, layers=1, layer_idx=0, seed=6):
    g = torch.Generator().manual_seed(seed)
    return make_ctx(torch.randn(b, h * grp, n, 8, generator=g), torch.randn(b, h, n, 8, generator=g),
                    layers=layers, layer_idx=layer_idx)


def test_headkv_budgets_follow_importance_with_base_and_sum_to_layer_budget(tmp_path):
    # budget 20, window 4 -> 16 per head beyond the window; beta 2 -> 8 base each + pool of 16 split 1:3
    press = HeadKVPress(budget=20, window_size=4, beta=2.0, scores_path=write_scores(tmp_path, [[1.0, 3.0]]))
    ctx = random_ctx()
    press.compress(ctx)
    layer = ctx.cache.layers[0]
    assert layer.entry_counts() == [4 + 8 + 4, 4 + 8 + 12]
    assert all({56, 57, 58, 59} <= s for s in kept(ctx)[0])  # every head keeps the window


@pytest.mark.parametrize("budget", [5, 13, 21, 37])
def test_headkv_awkward_shares_still_sum_exactly(tmp_path, budget):
    press = HeadKVPress(budget=budget, window_size=2, scores_path=write_scores(tmp_path, [[0.7, 0.2, 0.1]]))
    counts = press.head_counts(random_ctx(h=3), torch.tensor([budget]))
    assert int(counts.sum()) == 3 * budget and counts[0, 0] >= counts[0, 1] >= counts[0, 2] >= 2


def test_headkv_surplus_of_a_full_head_moves_to_the_others(tmp_path):
    press = HeadKVPress(budget=50, window_size=4, scores_path=write_scores(tmp_path, [[0.0, 1.0]]))
    ctx = random_ctx()  # 60 entries: head 1 would get 4 + 1 + 91
    press.compress(ctx)
    assert ctx.cache.layers[0].entry_counts() == [40, 60]


def test_headkv_without_scores_is_uniform_snapkv():
    ctx = random_ctx(b=2)
    HeadKVPress(compression_ratio=0.6, window_size=8).compress(ctx)
    ref = random_ctx(b=2)
    SnapKVPress(compression_ratio=0.6, window_size=8, pooling="max").compress(ref)
    assert kept(ctx) == kept(ref)
    assert ctx.cache.layers[0].entry_counts() == [2 * 24, 2 * 24]  # summed over the batch


def test_headkv_global_pool_moves_budget_between_layers(tmp_path):
    press = HeadKVPress(budget=20, window_size=4, pool="global",
                        scores_path=write_scores(tmp_path, [[1.0, 1.0], [3.0, 3.0]]))
    counts = [press.head_counts(random_ctx(layers=2, layer_idx=i), torch.tensor([20])) for i in (0, 1)]
    assert int(counts[1].sum()) > int(counts[0].sum())
    assert int(counts[0].sum() + counts[1].sum()) == 2 * 2 * 20


def test_headkv_reads_headkv_and_query_head_formats_and_rejects_bad_files(tmp_path):
    native = tmp_path / "heads.json"  # HeadKV's own format: "layer-head" -> list of scores
    native.write_text(json.dumps({"0-0": [1.0, 3.0], "0-1": [0.0], "0-2": [4.0], "0-3": [4.0]}))
    press = HeadKVPress(budget=20, window_size=4, scores_path=str(native))
    imp = press.importance(random_ctx())  # 4 query heads -> 2 KV heads: mean over the group
    torch.testing.assert_close(imp, torch.tensor([[1.0, 4.0]], dtype=torch.float64))
    with pytest.raises(KVForgeError, match="does not exist"):
        HeadKVPress(scores_path=str(tmp_path / "missing.json"))
    with pytest.raises(KVForgeError, match="shape"):
        HeadKVPress(budget=8, scores_path=write_scores(tmp_path, [[1.0, 2.0, 3.0]], "bad.json")).compress(random_ctx())
    with pytest.raises(KVForgeError, match="negative"):
        HeadKVPress(scores_path=write_scores(tmp_path, [[1.0, -2.0]], "neg.json"))


# ---------------------------------------------------------------------------------------------------------
# headkv-scores
# ---------------------------------------------------------------------------------------------------------
def test_head_scores_measure_needle_attention(smol_tokenizer):
    model = tiny_model("gemma3")
    scores = head_scores(model, smol_tokenizer, "niah_single_1", length=200, samples=2)
    assert scores.shape == (6, 2) and model.config._attn_implementation == "kvforge"
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    full = [i for i in range(6) if i not in sliding]
    assert (scores[sliding] == 0).all()  # the needle is beyond the 16-token window of the answer prefix
    assert (scores[full] > 0).all() and (scores[full] < 1).all()


def test_answer_token_positions_cover_the_needle_value(smol_tokenizer):
    from kvforge.eval.tasks import make_samples

    s = make_samples("niah_single_1", smol_tokenizer, 200, 1)[0]
    ctx_ids, _ = encode_prompt(smol_tokenizer, s.context, s.questions[0], s.answer_prefix, prompt_format="kvforge")
    pos = _answer_token_positions(smol_tokenizer, s.context, s.questions[0], s.answers[0], ctx_ids)
    assert pos and pos == list(range(pos[0], pos[-1] + 1))
    assert s.answers[0][0] in smol_tokenizer.decode([ctx_ids[i] for i in pos])


def test_cli_headkv_scores_writes_a_file_headkv_reads(tmp_path, monkeypatch, smol_tokenizer, capsys):
    import kvforge.models

    model = tiny_model("llama")
    monkeypatch.setattr(kvforge.models, "load_model", lambda *a, **k: (model, smol_tokenizer))
    out = tmp_path / "heads.json"
    assert main(["headkv-scores", "--model", "tiny", "--out", str(out), "--length", "200", "--samples", "1"]) == 0
    data = json.loads(out.read_text())
    assert data["task"] == "niah_single_1" and data["model"] == "tiny"
    assert len(data["scores"]) == 4 and all(len(r) == 2 for r in data["scores"])
    assert "4x2" in capsys.readouterr().out
    press = get_press("headkv", compression_ratio=0.5, scores_path=str(out))
    assert press.importance(random_ctx(layers=4)).shape == (4, 2)


# ---------------------------------------------------------------------------------------------------------
# end to end: a batch equals each context alone
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    out = {f: tiny_model(f) for f in ("llama", "gemma3")}
    # Gemma3's q/k RMSNorm weights start at zero (scale 1 + w): every key then has the same norm and l2norm
    # would be decided by rounding. Random norm weights make key norms informative.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in out["gemma3"].model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.5)
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", NEW)
def test_batch_equals_each_context_alone(models, smol_tokenizer, tmp_path, family, name):
    model, tok = models[family], smol_tokenizer
    kwargs = {}
    if name == "headkv":  # unequal head budgets
        g = torch.Generator().manual_seed(1)
        kwargs = dict(window_size=8, scores_path=write_scores(tmp_path, torch.rand(
            model.config.num_hidden_layers, model.config.num_key_value_heads, generator=g).tolist()))
    press = get_press(name, compression_ratio=0.5, **kwargs)
    batch, cache = generate(model, tok, CONTEXTS, QUESTIONS[:1], press=press, max_new_tokens=4, return_cache=True)
    assert batch == [generate(model, tok, c, QUESTIONS[:1], press=press, max_new_tokens=4) for c in CONTEXTS]
    assert all(row[0] for row in batch)  # real answers: the comparison means something
    assert cache.stats()["bytes"] < cache.stats()["uncompressed_bytes"]


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_window_attention_in_the_model_dtype_matches_the_float32_twin(dtype, bound, padded):
    """SnapKV/TOVA/NaCl's window attention computes its logits in the keys' dtype (no float32 copy of the keys) and
    its softmax in float32; on fresh random inputs, with left padding, it stays within the dtype's bound of the
    float32 twin: probabilities (each row sums to 1) and the scores SnapKV derives from them."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        query = (torch.randn(2, 8, 24, 32, generator=g) * 2).to(dtype)
        keys = (torch.randn(2, 2, 24, 32, generator=g) * 2).to(dtype)
        real = torch.ones(2, 24, dtype=torch.bool)
        real[1, :5] = False
        ctx = make_ctx(query, keys, key_real=real if padded else None)  # unpadded: no mask at all (all_real)
        fast, slow = ctx.window_attention(8), ctx.window_attention_reference(8)
        assert fast.dtype == slow.dtype == torch.float32 and not fast.isnan().any()
        assert (fast - slow).abs().max() <= bound, (fast - slow).abs().max()
        assert torch.allclose(fast.sum(-1), torch.ones(()), atol=1e-5)
        assert bool((fast[:, :, :, 0, -7:] == 0).all())  # causal: the first window query sees none after it
        if padded:
            assert bool((fast[1, :, :, :, :5] == 0).all())  # padding gets no attention


@pytest.mark.parametrize("seed", range(4))
def test_sort_free_selection_matches_the_stable_sort(seed):
    """`top_mask` / `mask_positions` / `row_cumsum` (threshold, one flat scan) against their slow twins (a stable
    descending sort, `nonzero`, a per-row `cumsum`), on scores full of ties, ±inf and NaN (counted as +inf); and the
    bit packing a prune parks its positions in, both ways."""
    from kvforge.cache.bits import mask_positions, pack_bits, row_cumsum, unpack_bits
    from kvforge.presses.base import descending_rank, top_mask

    gen = torch.Generator().manual_seed(seed)
    for shape in [(1, 4, 97), (2, 3, 64), (1, 1, 500)]:
        scores = torch.randint(0, 6, shape, generator=gen).float()  # many ties
        special = torch.rand(shape, generator=gen)
        scores[special < 0.05] = float("inf")
        scores[(special >= 0.05) & (special < 0.1)] = float("-inf")
        scores[(special >= 0.1) & (special < 0.12)] = float("nan")
        n = shape[-1]
        for k in [0, 1, 2, n // 3, n // 2, n - 1, n]:
            want = descending_rank(torch.where(scores.isnan(), float("inf"), scores)) < k
            got = top_mask(scores, k)
            assert torch.equal(got, want), (shape, k)
            assert (got.sum(-1) == k).all()
            pos = mask_positions(got, k)
            assert torch.equal(pos, got.nonzero()[:, -1].view(*shape[:-1], k))
            assert torch.equal(row_cumsum(got), got.cumsum(-1))
            assert torch.equal(unpack_bits(pack_bits(got), n), got)


def _plain_prefill_recording(press, scorer, rows: int, n: int, seed: int, skew: float = 0.0):
    """A plain prefill (no padding, no chunks) of `n` random tokens × `rows` through a tiny Llama and `press`, with
    `scorer`'s scores (`press` itself or the scorer it wraps) recorded per layer, each head's shifted by `skew` ×
    its index: (cache, {layer: (entries, scores)}); scores are None where the press did not score (nothing to
    remove)."""
    model = tiny_model("llama")
    seen = {}
    score, compress = scorer.score, press.compress

    def recording(ctx):
        s = score(ctx) + skew * torch.arange(ctx.keys.shape[1])[None, :, None]
        seen[ctx.layer_idx] = (ctx.keys.shape[2], s)
        return s

    def compressing(ctx):
        seen[ctx.layer_idx] = (ctx.keys.shape[2], None)
        compress(ctx)

    scorer.score, press.compress = recording, compressing
    cache = KVCache(model, press=press)
    ids = torch.randint(5, 200, (rows, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert seen
    return cache, seen


@pytest.mark.parametrize("spec", [dict(compression_ratio=0.0), dict(compression_ratio=0.3),
                                  dict(compression_ratio=0.75), dict(compression_ratio=0.999), dict(budget=5),
                                  dict(budget=1000)])
@pytest.mark.parametrize("name", ["knorm", "snapkv", "tova"])
def test_a_plain_prefill_keeps_the_entries_the_stable_sort_ranks_first(name, spec):
    """A plain prefill (no padding, no chunks) counts on the host and selects without a sort; what each layer keeps
    is what the definition keeps: the first `int(n·(1 − ratio))` (or `budget`) entries of a stable descending sort
    of the press's scores, in position order."""
    from kvforge.presses.base import descending_rank

    press = get_press(name, **spec)
    cache, seen = _plain_prefill_recording(press, press, rows=2, n=40, seed=3)
    for i, (n, scores) in seen.items():
        k = min(n, spec["budget"]) if "budget" in spec else int(n * (1 - spec["compression_ratio"]))
        if k >= n:  # nothing removed: the layer is left as it was
            assert cache.layers[i].entry_slots() is None and cache.layers[i].n == n
            continue
        want = (descending_rank(scores.float()) < k).nonzero()[:, -1].view(2, scores.shape[1], k)
        assert torch.equal(cache.layers[i].entry_slots(), want), (name, spec, i)


@pytest.mark.parametrize("alpha", [0.2, 0.9])
@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_adakv_on_a_plain_prefill_keeps_what_its_definition_keeps(ratio, alpha):
    """AdaKV on a plain prefill (counts on the host, sort-free selection) against its definition with the stable
    sort: per head the top floor(α·k) entries, then the best k·H of the layer, those floors counted first."""
    from kvforge.presses.base import descending_rank

    press = get_press("adakv", compression_ratio=ratio, alpha_safeguard=alpha, press="knorm")
    # heads made unequal, so that the floors decide part of what is kept
    cache, seen = _plain_prefill_recording(press, press.press, rows=1, n=48, seed=4, skew=10.0)
    for i, (n, scores) in seen.items():
        k = int(n * (1 - ratio))
        h = scores.shape[1]
        s = scores.float()
        s = torch.where(descending_rank(s) < int(alpha * k), float("inf"), s)
        want = (descending_rank(s.reshape(1, 1, h * n)) < k * h).reshape(1, h, n)
        _, _, slots, valid = cache.layers[i].entries()
        got = torch.zeros(1, h, n, dtype=torch.bool)
        for j in range(h):
            got[0, j, slots[0, j][valid[0, j]]] = True
        assert torch.equal(got, want), (ratio, alpha, i)
