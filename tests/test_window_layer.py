"""`WindowLayer` (kvforge.cache.window) against its definition, transformers' `DynamicSlidingWindowLayer`, side by
side on the same updates: prefill chunks longer and shorter than the window, then decoding steps; snapshots, forks,
and a sliding model's generation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvforge.cache.window import WindowLayer


def _same(a, b):
    assert a[0].shape == b[0].shape and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _step(layers, q: int, gen: torch.Generator, b: int = 2, h: int = 2, d: int = 4):
    k, v = torch.randn(b, h, q, d, generator=gen), torch.randn(b, h, q, d, generator=gen)
    outs = [layer.update(k.clone(), v.clone()) for layer in layers]
    _same(outs[0], outs[1])
    stock, ours = layers
    _same((stock.keys, stock.values), (ours.keys, ours.values))
    assert stock.get_seq_length() == ours.get_seq_length()
    for query in (1, 3):
        assert stock.get_mask_sizes(query) == ours.get_mask_sizes(query)


@pytest.mark.parametrize("seed", range(3))
def test_window_layer_returns_and_keeps_what_the_stock_layer_does(seed):
    gen = torch.Generator().manual_seed(seed)
    window = 16
    layers = [DynamicSlidingWindowLayer(window), WindowLayer(window)]
    for q in [int(x) for x in torch.randint(1, 3 * window, (3,), generator=gen)] + [1] * 150 + [5, 40] + [1] * 80:
        _step(layers, q, gen)


def test_decoding_appends_in_place_and_moves_the_window_once_per_slack():
    """The point of the layer: a decoding step writes one column; a new buffer only every `slack` steps."""
    gen = torch.Generator().manual_seed(0)
    window = 128
    layers = [DynamicSlidingWindowLayer(window), WindowLayer(window)]
    _step(layers, 300, gen)
    ours = layers[1]
    ptrs = []
    for _ in range(4 * ours.slack):
        _step(layers, 1, gen)
        ptrs.append(ours._buf[0].data_ptr())
    moves = sum(a != b for a, b in zip(ptrs, ptrs[1:]))
    assert 3 <= moves <= 4  # one new buffer per `slack` steps, not one per step


def test_snapshots_forks_and_replaced_keys_keep_their_contents():
    """What `KVCache.snapshot()` records (the `keys`/`values` references) still holds the same tokens after more
    steps; a restored or shallow-copied layer continues exactly as the stock layer does from there."""
    gen = torch.Generator().manual_seed(1)
    window = 16
    layers = [DynamicSlidingWindowLayer(window), WindowLayer(window)]
    _step(layers, 20, gen)
    states = [(layer.keys, layer.values, layer.cumulative_length, layer.is_initialized) for layer in layers]
    frozen = [(s[0].clone(), s[1].clone()) for s in states]
    forks = [copy.copy(layer) for layer in layers]
    for _ in range(100):  # past several moves of the window
        _step(layers, 1, gen)
    for s, f in zip(states, frozen):
        _same((s[0], s[1]), f)  # nothing handed out was overwritten
    for _ in range(30):
        _step(forks, 1, gen)  # the forks run on from the snapshot point, side by side
    for layer, s in zip(layers, states):
        layer.keys, layer.values, layer.cumulative_length, layer.is_initialized = s
    for _ in range(30):
        _step(layers, 1, gen)
    layers[0].keys, layers[0].values = layers[0].keys[:1], layers[0].values[:1]  # a batch row kept (transformers)
    layers[1].keys, layers[1].values = layers[1].keys[:1], layers[1].values[:1]
    for _ in range(3):
        _step(layers, 1, gen, b=1)


def test_a_sliding_model_generates_what_the_stock_cache_generates():
    """Gemma3 (sliding and full layers) through a `KVCache` — whose sliding layers are `WindowLayer`s — gives the
    tokens of transformers' own `DynamicCache`, past several window lengths."""
    from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig

    from kvforge import KVCache

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                        "full_attention"], max_position_embeddings=256)
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 21))
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=DynamicCache(config=cfg), **kw)
        cache = KVCache(model)
        got = model.generate(ids, past_key_values=cache, **kw)
    assert any(isinstance(layer, WindowLayer) for layer in cache.layers)
    assert torch.equal(got, want)


def test_stats_count_the_window_stored_and_its_spare_columns_allocated():
    """`KVCache.stats()`: `bytes` is the stored window (as the stock layer holds it), `allocated_bytes` adds the
    spare columns of each sliding layer's buffer."""
    from kvforge import KVCache
    from kvforge.models import tiny_model

    model = tiny_model("gemma3")
    cache = KVCache(model)
    ids = torch.randint(5, 100, (1, 40))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    sliding = [layer for layer in cache.layers if isinstance(layer, WindowLayer)]
    assert sliding
    stats = cache.stats()
    spare = sum(layer.allocated_bytes() - layer.keys.numel() * layer.keys.element_size() * 2 for layer in sliding)
    assert spare > 0
    assert stats["allocated_bytes"] >= stats["bytes"] + spare
