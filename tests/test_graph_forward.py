"""`GraphForward`: one captured forward of several new tokens over a cache whose contents change between calls
(KVLink's question step). Tested against its definition, the ordinary cached forward of the same tokens at the same
positions (fp32), for two contexts of different lengths through one `GraphForward` (the second call replays on a
GPU), and through `kvforge.link.prefill_ids(..., graph=...)` against the same call without it."""

import pytest
import torch

from kvforge import KVCache, KVForgeError
from kvforge.cache.graphs import GraphForward
from kvforge.generate import prefill
from kvforge.models import tiny_model


def context_cache(model, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=gen).to(next(model.parameters()).device)
    cache = KVCache(model, reserve=16)
    prefill(model, ids, torch.ones_like(ids), cache)
    return cache


def reference(model, cache, q_ids, position):
    """The ordinary cached forward of `q_ids` at `position..` over a copy of `cache`: logits and the layers."""
    fork = cache.fork()
    pos = torch.arange(position, position + q_ids.shape[1], device=q_ids.device)[None]
    with torch.inference_mode():
        out = model(input_ids=q_ids, position_ids=pos, past_key_values=fork, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], fork


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_graph_forward_equals_the_cached_forward_for_changing_contexts(family):
    model = tiny_model(family)
    step = GraphForward(model, capacity=96, width=7)
    for n, seed in ((40, 0), (73, 1), (12, 2)):  # longer, then shorter than the first: the same buffers
        cache = context_cache(model, n, seed)
        q_ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed + 9))
        want, fork = reference(model, cache, q_ids, n)
        got = step.run(cache, q_ids, n)
        assert torch.isfinite(got).all() and (got - want).abs().max() <= 1e-4 * want.abs().max()
        for a, b in zip(step.cache.layers, fork.layers):
            assert a.n == b.n == n + 7 and a.get_seq_length() == n + 7
            assert (a.keys - b.keys).abs().max() <= 1e-5 and (a.values - b.values).abs().max() <= 1e-5
        assert step.cache.layers[0].graph is None  # left in normal mode: decoding may continue from it


def test_graph_forward_refuses_what_it_cannot_serve():
    model = tiny_model("llama")
    cache = context_cache(model, 30, 0)
    with pytest.raises(KVForgeError, match="width >= 1 and capacity > width"):
        GraphForward(model, capacity=4, width=4)
    step = GraphForward(model, capacity=40, width=4)
    with pytest.raises(KVForgeError, match=r"ids of shape \(1, 5\); allowed: \[batch, 4\]"):
        step.run(cache, torch.ones(1, 5, dtype=torch.long), 30)
    with pytest.raises(KVForgeError, match=r"at most 36 \(capacity 40"):
        step.run(context_cache(model, 37, 1), torch.ones(1, 4, dtype=torch.long), 37)
    pruned = context_cache(model, 30, 0)
    pruned.keep_per_head(0, torch.rand(1, pruned.layers[0].keys.shape[1], 30) > 0.5)
    with pytest.raises(KVForgeError, match="plain full-attention layers .* layer 0 is"):
        step.run(pruned, torch.ones(1, 4, dtype=torch.long), 30)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graph_forward_replays_the_cached_forward_on_cuda():
    torch.manual_seed(0)
    model = tiny_model("llama").to("cuda")
    step = GraphForward(model, capacity=200, width=16)
    for n, seed in ((120, 0), (150, 1), (64, 2)):  # the first call captures, the next two replay
        cache = context_cache(model, n, seed)
        q_ids = torch.randint(3, model.config.vocab_size, (1, 16), device="cuda")
        want, _ = reference(model, cache, q_ids, n)
        got = step.run(cache, q_ids, n)
        assert torch.isfinite(got).all() and (got - want).abs().max() <= 1e-3 * want.abs().max()
    assert step.graph is not None


def test_link_prefill_with_a_graph_forward_equals_without():
    """KVLink's request path with the prompt's forward through a `GraphForward`: the logits and the cache of the
    ordinary path, for requests with different documents (later ones through the same buffers), with and without
    link tokens."""
    from kvforge.link import Links, MemoryStore
    from kvforge.link.reuse import Request, prefill_ids

    model = tiny_model("llama")
    hi = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    store = MemoryStore(model)
    links = Links(2, 3, tuple(f"<l{i}>" for i in range(6)), tuple(range(50, 56)))  # existing ids stand in
    step = GraphForward(model, capacity=160, width=6)
    for n_docs, use in ((3, None), (2, links), (3, links)):
        docs = [torch.randint(3, hi, (int(torch.randint(10, 40, (1,), generator=gen)),), generator=gen).tolist()
                for _ in range(n_docs)]
        req = Request([], docs, [torch.randint(3, hi, (6,), generator=gen).tolist()])
        want_cache, want = prefill_ids(model, None, req, store=store, links=use)
        got_cache, got = prefill_ids(model, None, req, store=store, links=use, graph=step)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        assert got_cache is step.cache and got_cache.get_seq_length() == want_cache.get_seq_length()
        for a, b in zip(got_cache.layers, want_cache.layers):
            assert (a.keys - b.keys).abs().max() <= 1e-5
    with pytest.raises(KVForgeError, match="one prompt at a time"):
        prefill_ids(model, None, Request([], docs, [[5] * 6, [7] * 6]), store=store, graph=step)
