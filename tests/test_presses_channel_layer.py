"""ThinK (key-channel pruning) and MiniCache (cross-layer merging): defining behaviour on constructed inputs,
storage really reduced, and runs through generation."""

import math

import pytest
import torch

from kvforge import KVForgeError, generate, get_press
from kvforge.cache import KVCache
from kvforge.cache.coded import CodedLayer
from kvforge.models import tiny_config, tiny_model
from kvforge.presses import LayerContext
from kvforge.presses.minicache import merge_pair, slerp

CONTEXT = "The red fox sleeps under the old oak tree near the river. " * 4


def one_layer(keys, values, query, layers=1):
    cache = KVCache(tiny_config("llama", num_hidden_layers=layers))
    for i in range(layers):
        cache.layers[i].update(keys[i] if layers > 1 else keys, values[i] if layers > 1 else values)
    return cache, [LayerContext(None, cache, i, query, None, None) for i in range(layers)]


# -- ThinK -------------------------------------------------------------------------------------------------------

def test_think_keeps_the_channels_with_the_largest_query_key_magnitude():
    torch.manual_seed(0)
    b, h, n, d = 1, 2, 12, 16
    keys, values = torch.randn(b, h, n, d) * 0.1, torch.randn(b, h, n, d)
    query = torch.randn(b, 2 * h, n, d) * 0.1
    # head 0: channels 2, 5, 9 carry large keys; the query is large on 5 and 9 and on 11 (where keys are small)
    keys[0, 0, :, [2, 5, 9]] *= 30
    query[0, 0:2, -4:, [5, 9, 11]] *= 30
    # products ‖Q_c‖·‖K_c‖: 5 and 9 large on both, 2 only on K, 11 only on Q
    cache, (ctx,) = one_layer(keys, values, query)
    get_press("think", compression_ratio=1 - 4 / 16, window_size=4).compress(ctx)
    layer = cache.layers[0]
    assert isinstance(layer, CodedLayer)
    chosen = layer.codec.channels[0, 0].tolist()
    assert len(chosen) == 4 and {5, 9} <= set(chosen)
    qn = query[0, 0:2, -4:].norm(dim=1).sum(0)  # by hand: ‖Q_w[:, c]‖ summed over the group
    score = qn * keys[0, 0].norm(dim=0)
    assert set(chosen) == set(score.topk(4).indices.tolist())
    # the stored keys have 4 channels; reading them gives zeros elsewhere, values untouched
    assert layer.codec.keys.shape == (1, 2, n, 4)
    k, v = layer.full()
    assert torch.equal(k[0, 0][:, chosen], keys[0, 0][:, chosen]) and torch.equal(v, values)
    assert k[0, 0][:, [c for c in range(d) if c not in chosen]].abs().sum() == 0
    assert layer.stored_bytes() < (keys.numel() + values.numel()) * 4 * (1 + 4 / 16) / 2 + 64 * 8


def test_think_attention_equals_attention_over_the_kept_channels():
    torch.manual_seed(1)
    keys, values, query = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 4, 10, 16)
    cache, (ctx,) = one_layer(keys, values, query)
    get_press("think", compression_ratio=0.5).compress(ctx)
    layer = cache.layers[0]
    ch = layer.codec.channels  # [1, 2, 8]
    q = torch.randn(1, 4, 16)
    k, _ = layer.full()
    for qh in range(4):
        h = qh // 2
        by_hand = keys[0, h][:, ch[0, h]] @ q[0, qh][ch[0, h]]
        assert torch.allclose(k[0, h] @ q[0, qh], by_hand, atol=1e-5)


def test_think_zero_ratio_is_a_no_op():
    model = tiny_model("llama")
    from kvforge.models import load_tokenizer

    tok = load_tokenizer()
    plain = generate(model, tok, CONTEXT, ["Where?"], max_new_tokens=8)
    assert generate(model, tok, CONTEXT, ["Where?"], press=get_press("think", compression_ratio=0.0),
                    max_new_tokens=8) == plain


# -- MiniCache ---------------------------------------------------------------------------------------------------

def test_slerp_interpolates_on_the_sphere():
    u1, u2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    e, theta = slerp(u1, u2, 0.6)
    assert torch.allclose(theta, torch.tensor([math.pi / 2]))
    assert torch.allclose(e, torch.tensor([[math.cos(0.6 * math.pi / 2), math.sin(0.6 * math.pi / 2)]]))
    e, _ = slerp(u1, u1, 0.3)  # parallel: the direction itself
    assert torch.allclose(e, u1)


def test_minicache_restores_per_layer_magnitudes_and_retains_distinct_tokens():
    torch.manual_seed(0)
    n, d = 40, 16
    base = torch.randn(1, 2, n, d)
    x1 = base * 3.0 + 0.05 * torch.randn(1, 2, n, d)
    x2 = base * 0.5 + 0.05 * torch.randn(1, 2, n, d)  # same directions, other magnitudes
    x2[0, 0, 7] = -x1[0, 0, 7]  # one token points elsewhere: retained
    e, n1, n2, retained = merge_pair(x1, x2, 0.6, 0.05)
    assert retained.sum(-1).tolist() == [[2, 2]]  # ⌈0.05·40⌉ per head
    assert bool(retained[0, 0, 7])
    assert torch.allclose(n1, x1.norm(dim=-1)) and torch.allclose(n2, x2.norm(dim=-1))
    # through the press on a 4-layer cache (pairs from the middle: layers 2 and 3)
    vals = [torch.randn(1, 2, n, d) for _ in range(4)]
    keys = [torch.randn(1, 2, n, d), torch.randn(1, 2, n, d), x1, x2]
    cache, ctxs = one_layer(keys, vals, torch.randn(1, 4, n, d), layers=4)
    press = get_press("minicache")
    for ctx in ctxs:
        press.compress(LayerContext(None, cache, ctx.layer_idx, ctx.query, None, None))
    assert not isinstance(cache.layers[1], CodedLayer) and isinstance(cache.layers[2], CodedLayer)
    a, b = cache.layers[2], cache.layers[3]
    assert a.codec.shared is b.codec.shared  # one direction tensor for the pair
    ka, kb = a.full()[0], b.full()[0]
    assert torch.allclose(ka.norm(dim=-1), x1.norm(dim=-1), atol=1e-4)  # magnitudes restored per layer
    assert torch.allclose(kb.norm(dim=-1), x2.norm(dim=-1), atol=1e-4)
    assert torch.equal(kb[0, 0, 7], x2[0, 0, 7]) and torch.equal(ka[0, 0, 7], x1[0, 0, 7])  # retained exactly
    cos = torch.nn.functional.cosine_similarity(ka, kb, dim=-1)
    assert (cos[~retained] > 0.9999).all()  # merged tokens share one direction
    # storage: one direction tensor for two layers, plus magnitudes (1/D of a tensor) and retained tokens
    tensor = 2 * n * d * 4  # one [1, 2, n, d] float32 tensor
    retained_bytes = 2 * 2 * 2 * 2 * (8 + d * 4)  # layers × (K, V) × heads × 2 retained: index + vector
    expect = 2 * tensor + 2 * 2 * (tensor // d) + retained_bytes
    assert a.stored_bytes() + b.stored_bytes() == expect < 0.65 * (4 * tensor)


def test_minicache_identical_layers_reconstruct_exactly():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 20, 16)
    e, n1, n2, _ = merge_pair(x, x.clone(), 0.6, 0.0)
    assert torch.allclose(e * n1[..., None], x, atol=1e-5)


def test_minicache_rejects_a_ratio_and_layers_with_different_tokens(models_two=None):
    with pytest.raises(KVForgeError, match="compression_ratio must be 0"):
        get_press("minicache", compression_ratio=0.5)
    from kvforge.models import load_tokenizer

    press = get_press("composed", presses=[get_press("snapkv", compression_ratio=0.5), get_press("minicache")])
    with pytest.raises(KVForgeError, match="same tokens"):
        generate(tiny_model("llama"), load_tokenizer(), CONTEXT, ["Where?"], press=press, max_new_tokens=2)


def test_minicache_frees_memory_in_generation():
    from kvforge.models import load_tokenizer

    model = tiny_model("llama", num_hidden_layers=8)
    _, full = generate(model, load_tokenizer(), CONTEXT, ["Where?"], max_new_tokens=2, return_cache=True)
    _, merged = generate(model, load_tokenizer(), CONTEXT, ["Where?"], press=get_press("minicache"),
                         max_new_tokens=2, return_cache=True)
    coded = [i for i, layer in enumerate(merged.layers) if isinstance(layer, CodedLayer)]
    assert coded == [4, 5, 6, 7]
    # two pairs of eight layers store one direction each: about 1/4 less, plus magnitudes and 5% retained
    ratio = merged.stats()["bytes"] / full.stats()["bytes"]
    assert 0.75 < ratio < 0.85
