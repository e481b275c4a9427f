"""Streaming (kvforge.streaming): the sink + window cache against definitions, the modes, fixed memory, bad input.

What `sw` means exactly (StreamingLLM with re-rotation): at every step attention sees the `n_sink` first tokens and
the most recent ones, as entries at positions 0..n-1 (the current token at n-1), each entry's K/V being what the
model computed for that token when it was fed. The independent reference below builds exactly that from stock
parts — a transformers DynamicCache, entry `n_sink` deleted when full and the keys after it turned back by one
position with `kvforge.rope.rotate`. A plain forward over [sinks + window] recomputed from scratch is the same
thing only for a one-layer model (deeper layers' K/V depend on the context each token was computed in; making them
agree is what KV-Align tries to learn, and what `ar` pays for): tested too.
"""

import pytest
import torch
from helpers import FAMILIES
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from kvforge.errors import KVForgeError
from kvforge.models import tiny_model
from kvforge.rope import rope_for_layer, rotate
from kvforge.streaming import AR, KV, SW, KVAlign, Stream, Window, streaming_cache
from kvforge.streaming.ppl import full_nll, perplexity, stream_nll


def small(family: str, **overrides):
    """A tiny model of `family` with a 512-token vocabulary (the LM head dominates a tiny model's step)."""
    return tiny_model(family, vocab_size=512, **overrides)


def ids_for(vocab: int, t: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 2000), (batch, t), generator=g)


def tiny_gpt2(n_positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=n_positions)
    return GPT2LMHeadModel(cfg).eval()


@torch.inference_mode()
def reference_sw(model, ids: torch.Tensor, cache_size: int, n_sink: int) -> torch.Tensor:
    """Logits `[B, T, V]` of StreamingLLM by definition (see the module docstring), one token at a time."""
    cfg = model.config.get_text_config()
    rotary = getattr(cfg, "rope_parameters", None)
    ropes = [rope_for_layer(cfg, i) for i in range(cfg.num_hidden_layers)] if rotary else None
    cache, out = DynamicCache(), []
    for t in range(ids.shape[1]):
        n = cache.get_seq_length()
        if n == cache_size:
            for i, layer in enumerate(cache.layers):
                rest = layer.keys[:, :, n_sink + 1 :]
                rest = rotate(rest, -1, ropes[i]) if ropes else rest  # GPT-2: just drop
                layer.keys = torch.cat([layer.keys[:, :, :n_sink], rest], 2)
                layer.values = torch.cat([layer.values[:, :, :n_sink], layer.values[:, :, n_sink + 1 :]], 2)
            n -= 1
        pos = torch.full((ids.shape[0], 1), n)
        out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, position_ids=pos).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_sw_perplexity_equals_full_when_the_cache_holds_the_text(family):
    model = small(family)
    ids = ids_for(model.config.vocab_size, 41)
    full = perplexity(full_nll(model, ids, chunk=16))
    for size in (64, 41):  # larger than the text, and exactly as large (no eviction either way)
        sw = perplexity(stream_nll(model, ids, SW(cache_size=size, n_sink=4)))
        assert abs(sw - full) / full < 1e-4, (size, sw, full)


YARN = dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                 original_max_position_embeddings=512))  # attention_scaling 1.14


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("gemma3", {}), ("phi3", {}), ("llama", YARN),
                                               ("gpt_neox", {}), ("olmo3", {}), ("smollm3", {}), ("cohere", {}),
                                               ("cohere2", {}), ("glm4", {}), ("exaone4", {}), ("gpt_oss", {})],
                         ids=["llama", "gemma3", "phi3", "llama-yarn", "gpt_neox", "olmo3", "smollm3-nope",
                              "cohere-interleaved", "cohere2-nope-global", "glm4-partial-interleaved",
                              "exaone4-nope-global", "gpt_oss-sinks"])
def test_sw_after_evictions_equals_streamingllm_by_definition(family, overrides):
    model = small(family, **overrides)
    ids = ids_for(model.config.vocab_size, 28, batch=2)
    ref = reference_sw(model, ids, cache_size=12, n_sink=3)
    got = Stream(model, SW(cache_size=12, n_sink=3)).step(ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # and a mutation of the definition is caught: without re-rotation the logits differ
    plain = Stream(model, SW(cache_size=12, n_sink=3))
    for layer in plain.cache.layers:
        layer.rope = None
    assert (plain.step(ids)[:, 12:] - ref[:, 12:]).abs().max() > 1e-2


def test_slot_order_reads_equal_position_order_reads():
    """Full-attention layers hand attention their ring as it is; reading everything in position order (what
    sliding-window layers do) gives the same logits."""
    model = small("qwen3")
    ids = ids_for(512, 30)
    plain = Stream(model, SW(cache_size=9, n_sink=2))
    ordered = Stream(model, SW(cache_size=9, n_sink=2))
    for layer in ordered.cache.layers:
        assert not layer.ordered
        layer.ordered = True
    torch.testing.assert_close(plain.step(ids), ordered.step(ids), rtol=1e-5, atol=1e-5)
    layer = plain.cache.layers[0]
    assert torch.equal(layer.order()[layer.slot_positions()], torch.arange(9))  # inverse permutations
    assert torch.equal(layer.slot_tables()[0], layer._cos[layer.slot_positions()])  # each slot turned to its position


def test_sw_one_layer_equals_recompute_over_sinks_and_window():
    """One layer: K/V depend on the token and its position only, so sw is a plain forward over [sinks + window]."""
    model = small("llama", num_hidden_layers=1)
    ids = ids_for(model.config.vocab_size, 30)
    c, s = 10, 4
    got = Stream(model, SW(cache_size=c, n_sink=s)).step(ids)
    for t in (c, 17, 29):  # after 1, 8 and 20 evictions
        seq = torch.cat([ids[:, :s], ids[:, t + 1 - (c - s) : t + 1]], 1)
        with torch.inference_mode():
            want = model(input_ids=seq).logits[:, -1]
        torch.testing.assert_close(got[:, t], want, rtol=1e-4, atol=1e-4)


def test_window_is_sw_without_sinks_and_differs_after_eviction():
    model = small("llama")
    ids = ids_for(model.config.vocab_size, 30)
    win = Stream(model, Window(cache_size=10)).step(ids)
    torch.testing.assert_close(win, reference_sw(model, ids, 10, 0), rtol=1e-4, atol=1e-4)
    sw = Stream(model, SW(cache_size=10, n_sink=4)).step(ids)
    torch.testing.assert_close(win[:, :10], sw[:, :10])  # nothing evicted yet: the same
    assert (win[:, 10:] - sw[:, 10:]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_ar_equals_plain_forward_over_the_last_n_tokens(family):
    model = small(family)
    ids = ids_for(model.config.vocab_size, 28)
    n = 9
    with torch.inference_mode():
        want = torch.stack([model(input_ids=ids[:, max(0, t + 1 - n) : t + 1]).logits[0, -1] for t in range(28)])
    got = Stream(model, AR(cache_size=n)).step(ids)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    nll = stream_nll(model, ids, AR(cache_size=n))[0]  # the batched-window path of `kvforge ppl`
    ref = torch.nn.functional.cross_entropy(want[:-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(nll, ref, rtol=1e-4, atol=1e-4)


def test_ar_keeps_no_window_logits_alive():
    """`ar` over a prompt longer than the cache runs one forward per token; each returns the whole window's logits
    `[B, n, V]`. Keeping a view of the last row kept them all alive (77 GiB on an H100 for a 1,871-token prompt,
    cache 1024, GPT-2's 50k vocabulary): at most the newest one may be alive when the next forward runs."""
    import weakref

    model = small("llama")
    stream = Stream(model, AR(cache_size=6))
    alive: list = []
    forward = stream._forward

    def counting(ids, cache):  # the logits in a numpy array, which lives exactly as long as their storage
        assert sum(r() is not None for r in alive) <= 1
        array = forward(ids, cache).numpy().copy()
        alive.append(weakref.ref(array))
        return torch.from_numpy(array)

    stream._forward = counting
    out = stream.step(ids_for(model.config.vocab_size, 20))
    assert out.shape[1] == 20 and len(alive) == 20  # longer than the cache: one forward per token


def test_batch_rows_stream_independently():
    model = small("qwen2")
    ids = ids_for(model.config.vocab_size, 25, batch=2, seed=3)
    both = Stream(model, SW(cache_size=8, n_sink=2)).step(ids)
    for r in range(2):
        alone = Stream(model, SW(cache_size=8, n_sink=2)).step(ids[r : r + 1])
        torch.testing.assert_close(both[r : r + 1], alone, rtol=1e-4, atol=1e-4)


def test_memory_is_fixed_and_lengths_drive_positions():
    model = small("llama")
    stream = Stream(model, SW(cache_size=8, n_sink=2))
    ids = ids_for(model.config.vocab_size, 30)
    stream.step(ids[:, :5])
    layer = stream.cache.layers[0]
    buffers = (layer.keys.untyped_storage().data_ptr(), layer.values.untyped_storage().data_ptr())
    sizes = []
    for t in range(5, 30):
        stream.step(ids[:, t : t + 1])
        assert stream.cache.get_seq_length() == min(t + 1, 7)  # the next token's position, inside the cache
        sizes.append(stream.cache.stats()["bytes"])
    assert (layer.keys.untyped_storage().data_ptr(), layer.values.untyped_storage().data_ptr()) == buffers
    assert set(sizes[3:]) == {2 * 4 * 2 * 8 * 16 * 4}  # full from 8 tokens on: K+V, layers, heads, C, D, fp32
    assert layer.shifts().tolist() == [0, 0, 5, 4, 3, 2, 1, 0]  # each window entry moved since it came in at 7


def test_gpt2_sw_drops_without_rotation():
    model = tiny_gpt2()
    ids = ids_for(300, 30, batch=2)
    got = Stream(model, SW(cache_size=10, n_sink=4)).step(ids)
    torch.testing.assert_close(got, reference_sw(model, ids, 10, 4), rtol=1e-4, atol=1e-4)
    full = perplexity(full_nll(model, ids))
    assert abs(perplexity(stream_nll(model, ids, SW(cache_size=32))) - full) / full < 1e-4


def test_kv_with_untrained_networks_is_sw_and_applies_after_evictions():
    model = small("llama")
    ids = ids_for(model.config.vocab_size, 24)
    nets = KVAlign.for_model(model, num_pos=16)
    sw = Stream(model, SW(cache_size=8, n_sink=2)).step(ids)
    torch.testing.assert_close(Stream(model, KV(cache_size=8, n_sink=2, nets=nets)).step(ids), sw)
    calls = []
    apply = nets.apply
    nets.apply = lambda *a: calls.append(a[3].tolist()) or apply(*a)
    Stream(model, KV(cache_size=8, n_sink=2, nets=nets)).step(ids)
    assert len(calls) == 4 * (24 - 8)  # every layer, every step after the first eviction
    assert calls[-1] == [5, 4, 3, 2, 1]  # the shifted window entries (all but the newest)


def one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize("size, sinks", [(4, 4), (3, 4), (0, 0)])
def test_cache_not_larger_than_the_sinks(size, sinks):
    model = small("llama")
    with pytest.raises(KVForgeError) as e:
        Stream(model, SW(cache_size=size, n_sink=sinks))
    assert "not larger than" in one_line(e)


def test_cache_larger_than_the_positions_and_too_many_tokens_at_once():
    with pytest.raises(KVForgeError) as e:
        streaming_cache(tiny_gpt2(n_positions=64), cache_size=65)
    assert "64 positions" in one_line(e)
    model = small("llama")
    cache = streaming_cache(model, cache_size=8, n_sink=2)
    with pytest.raises(KVForgeError) as e:
        model(input_ids=ids_for(512, 9), past_key_values=cache)
    assert "at most 8" in one_line(e)


def test_kv_without_networks_or_with_another_models():
    model = small("llama")
    with pytest.raises(KVForgeError) as e:
        Stream(model, KV(cache_size=16))
    assert "kv-align" in one_line(e)
    for other in (tiny_model("llama", seed=1, vocab_size=512), small("qwen2")):
        with pytest.raises(KVForgeError) as e:
            Stream(model, KV(cache_size=16, nets=KVAlign.for_model(other)))
        assert "do not fit" in one_line(e)


def test_ppl_rows_split_the_predictions_and_stream_side_by_side():
    from kvforge.streaming.ppl import ar_nll, split_rows

    ids = torch.arange(13)[None]
    assert split_rows(ids, 3).tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    with pytest.raises(KVForgeError):
        split_rows(ids, 5)
    model = small("llama")
    rows = split_rows(ids_for(512, 25), 2)
    both = ar_nll(model, rows, 5)
    torch.testing.assert_close(both[1:], ar_nll(model, rows[1:], 5))
    assert both.shape == (2, 12)


# -- graph mode: device-side counters, one captured step replayed ----------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3", "gpt2"])
def test_graph_mode_stream_equals_streamingllm_by_definition(family):
    """`Stream(..., cuda_graph=True)` switches to graph mode once the cache is full (on CPU it runs eagerly): the
    slot written, the slots' positions, the read order and the shifts then come from a device counter. Fed token by
    token through three full turns of the ring, it gives the definition's logits (Gemma 3: ordered sliding reads)."""
    model = tiny_gpt2() if family == "gpt2" else small(family)
    ids = ids_for(model.config.vocab_size, 40, batch=2)
    ref = reference_sw(model, ids, cache_size=12, n_sink=3)
    stream = Stream(model, SW(cache_size=12, n_sink=3), cuda_graph=True)
    got = torch.cat([stream.step(ids[:, :12])] + [stream.step(ids[:, t : t + 1]) for t in range(12, 40)], 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    layer = stream.cache.layers[0]
    assert layer._seen_t is not None and int(layer._seen_t) == layer.seen == 40  # device and host counters agree


def test_graph_mode_kv_align_equals_the_ordinary_path():
    """KV-Align in graph mode (shifts from the device counter) gives the ordinary path's logits, with networks that
    are not the identity; several tokens in one call work too (each a graph step)."""
    model = small("llama")
    ids = ids_for(model.config.vocab_size, 30)
    nets = KVAlign.for_model(model, num_pos=16)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(nets.key_net.parameters()) + list(nets.value_net.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    want = Stream(model, KV(cache_size=8, n_sink=2, nets=nets)).step(ids)
    stream = Stream(model, KV(cache_size=8, n_sink=2, nets=nets), cuda_graph=True)
    got = torch.cat([stream.step(ids[:, :8]), stream.step(ids[:, 8:9]), stream.step(ids[:, 9:])], 1)
    assert (want - Stream(model, SW(cache_size=8, n_sink=2)).step(ids)).abs().max() > 1e-3  # nets change things
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_graph_mode_needs_a_full_layer():
    stream = Stream(small("llama"), SW(cache_size=8, n_sink=2))
    stream.step(ids_for(512, 5))
    with pytest.raises(KVForgeError, match="needs a full cache"):
        stream.cache.layers[0].enter_graph_mode()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_captured_stream_equals_eager_stream_on_cuda(family):
    """On CUDA the full-cache step is captured once and replayed: the same logits as the eager stream, and the
    greedy tokens of a 200-step generation identical."""
    model = (tiny_gpt2() if family == "gpt2" else small(family)).cuda()
    ids = ids_for(model.config.vocab_size, 60, batch=2).cuda()
    eager = Stream(model, SW(cache_size=16, n_sink=4)).step(ids)
    stream = Stream(model, SW(cache_size=16, n_sink=4), cuda_graph=True)
    got = torch.cat([stream.step(ids[:, :16])] + [stream.step(ids[:, t : t + 1]) for t in range(16, 60)], 1)
    assert stream._graph is not None
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    a, b = Stream(model, SW(cache_size=16, n_sink=4)), Stream(model, SW(cache_size=16, n_sink=4), cuda_graph=True)
    ta, tb = ids[:, :1], ids[:, :1]
    for _ in range(200):
        ta, tb = a.step(ta)[:, -1:].argmax(-1), b.step(tb)[:, -1:].argmax(-1)
        assert torch.equal(ta, tb)


# -- quantized entries ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def reference_sw_quantized(model, ids: torch.Tensor, cache_size: int, n_sink: int, bits: int) -> torch.Tensor:
    """StreamingLLM by definition (as `reference_sw`) where every entry, when it comes in, is replaced by its
    quantize-dequantize: values as they are, keys pre-RoPE (un-rotated from the position the model gave them, then
    rotated back) — per token, channel groups of 32, `kvforge.kernels.quantize`'s value scheme."""
    from kvforge.kernels.quantize import dequantize_values, quantize_values
    from kvforge.rope import apply, unapply

    def qdq(x):
        return dequantize_values(*quantize_values(x, bits, 32), bits, 32, x.dtype)

    cfg = model.config.get_text_config()
    rotary = getattr(cfg, "rope_parameters", None)
    ropes = [rope_for_layer(cfg, i) for i in range(cfg.num_hidden_layers)] if rotary else None
    cache, out = DynamicCache(), []
    for t in range(ids.shape[1]):
        n = cache.get_seq_length()
        if n == cache_size:
            for i, layer in enumerate(cache.layers):
                rest = layer.keys[:, :, n_sink + 1 :]
                rest = rotate(rest, -1, ropes[i]) if ropes else rest
                layer.keys = torch.cat([layer.keys[:, :, :n_sink], rest], 2)
                layer.values = torch.cat([layer.values[:, :, :n_sink], layer.values[:, :, n_sink + 1 :]], 2)
            n -= 1
        pos = torch.full((ids.shape[0], 1), n)
        out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, position_ids=pos).logits)
        for i, layer in enumerate(cache.layers):  # the entry just written, as a quantized cache would hold it
            k = layer.keys[:, :, -1:]
            layer.keys[:, :, -1:] = apply(qdq(unapply(k, n, ropes[i])), n, ropes[i]) if ropes else qdq(k)
            layer.values[:, :, -1:] = qdq(layer.values[:, :, -1:])
    return torch.cat(out, 1)


@pytest.mark.parametrize("family, steps", [("gpt2", 30), ("llama", 20)])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_quantized_stream_equals_the_quantized_definition(family, steps, cuda_graph):
    """4-bit entries: the logits of quantizing each entry as it comes in (the token that computed it sees it
    exact), fed one token at a time through the definition — also in graph mode. Rotary keys are quantized pre-RoPE,
    which the reference reaches through `kvforge.rope.unapply` and the layer through its own tables: a 1e-7
    difference there can flip a code once in a while, so the llama check stops at 20 steps (10 evictions);
    GPT-2 has no such step and runs 30. And the error grows as bits shrink (8 < 4 < 2, against unquantized)."""
    model = tiny_gpt2() if family == "gpt2" else small("llama", head_dim=32)
    ids = ids_for(model.config.vocab_size, steps, batch=2)
    want = reference_sw_quantized(model, ids, 10, 2, bits=4)
    stream = Stream(model, SW(cache_size=10, n_sink=2, bits=4), cuda_graph=cuda_graph)
    got = torch.cat([stream.step(ids[:, t : t + 1]) for t in range(steps)], 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - reference_sw(model, ids, 10, 2)).abs().max() > 1e-3  # quantization does change the logits
    exact = Stream(model, SW(cache_size=10, n_sink=2)).step(ids)
    errs = [(Stream(model, SW(cache_size=10, n_sink=2, bits=b)).step(ids) - exact).abs().max() for b in (8, 4, 2)]
    assert 0 < errs[0] < errs[1] < errs[2], errs


def test_quantized_cache_stores_codes_only():
    """Bytes per entry and layer: codes D·bits/8 + a scale and a minimum per 32 channels, for K and for V, and
    nothing else between steps; fixed over the stream."""
    model = small("llama", head_dim=64)  # 4 KV heads? read from the config
    cfg = model.config
    ids = ids_for(cfg.vocab_size, 20)
    full = Stream(model, SW(cache_size=12, n_sink=2))
    quant = Stream(model, SW(cache_size=12, n_sink=2, bits=4))
    full.step(ids)
    quant.step(ids)
    kv_heads = cfg.num_key_value_heads
    per_entry = 2 * (64 * 4 // 8 + 2 * (64 // 32) * 4)  # K and V: codes + fp32 scale and minimum per group
    assert quant.cache.stats()["bytes"] == cfg.num_hidden_layers * kv_heads * 12 * per_entry
    assert full.cache.stats()["bytes"] == cfg.num_hidden_layers * kv_heads * 12 * 2 * 64 * 4
    layer = quant.cache.layers[0]
    assert layer._k is None and layer._v is None  # no decoded copy kept


def test_quantized_bits_are_checked():
    with pytest.raises(KVForgeError, match="bits=3 for the streaming cache; allowed: 16, 8, 4, 2"):
        Stream(small("llama"), SW(cache_size=8, n_sink=2, bits=3))
