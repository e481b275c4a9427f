"""kvforge.link's request path costs no more host work than the engine's ordinary cached forward: the question's
forward over reused documents launches the same aten ops per layer as a forward of the same tokens over a `KVCache`
filled by an ordinary prefill, nothing reads the device back (a host-device sync stalls the launch queue), and
placing the documents costs a few ops per layer whatever the number of documents. Counted with torch.profiler
(top-level aten ops; a view counts like a kernel, since each costs host time), never timed: on a GPU the question's
64-token forward is bound by these launches, not by arithmetic."""

import collections

import pytest
import torch
from helpers import FAMILIES

from kvforge import KVCache
from kvforge.link.reuse import Request, document_cache, prefill_ids
from kvforge.link.store import MemoryStore
from kvforge.models import tiny_model
from kvforge.rope import rope_for_layer, rotate, rotate_

SYNCS = {"item", "_local_scalar_dense", "is_nonzero", "nonzero", "equal"}  # ops that read a tensor on the host
N_DOCS, DOC_TOKENS, QUESTION = 10, 12, 16


def aten_ops(fn) -> collections.Counter:
    """Top-level aten ops run by `fn()` (an op called inside another aten op is not counted again)."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            ops[e.name[len("aten::"):]] += 1
    return ops


def paths(n_layers: int) -> dict:
    """For a tiny Llama of `n_layers`: the whole reuse request, its placement alone, and the ordinary forward of the
    same question over a KVCache of the same documents (prefilled without reuse)."""
    model = tiny_model("llama", num_hidden_layers=n_layers)
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(100, 5000, (DOC_TOKENS,), generator=gen).tolist() for _ in range(N_DOCS)]
    question = torch.randint(100, 5000, (QUESTION,), generator=gen).tolist()
    req, store = Request([], docs, [question]), MemoryStore(model)
    for d in docs:
        store.get(d)
    n = N_DOCS * DOC_TOKENS
    cache = KVCache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[t for d in docs for t in d]]), past_key_values=cache)
    ids, pos = torch.tensor([question]), torch.arange(n, n + QUESTION)[None]
    return {
        "request": lambda: prefill_ids(model, None, req, store=store),
        "placement": lambda: document_cache(model, None, req, store=store, reserve=QUESTION + 256),
        "ordinary": lambda: model(input_ids=ids, position_ids=pos, past_key_values=cache, logits_to_keep=1),
    }


@pytest.fixture(scope="module")
def counts() -> dict:
    """Op counts of each path at 2 and 6 layers, the question's forward being the request less its placement."""
    out = {}
    for n_layers in (2, 6):
        got = {name: aten_ops(fn) for name, fn in paths(n_layers).items()}
        got["question"] = got["request"] - got["placement"]
        out[n_layers] = got
    return out


def per_layer(counts, path: str, op: str | None = None) -> tuple[float, float]:
    """(ops per layer, ops outside the layers) of `path` (only `op` when given), from the 2- and 6-layer counts."""
    a, b = (sum(c[path].values()) if op is None else c[path][op] for c in (counts[2], counts[6]))
    slope = (b - a) / 4
    return slope, a - 2 * slope


def test_request_reads_nothing_back_from_the_device(counts):
    for n_layers in (2, 6):
        syncs = {op: k for op, k in counts[n_layers]["request"].items() if op in SYNCS}
        assert not syncs, syncs


def test_question_forward_costs_an_ordinary_cached_forward(counts):
    q_layer, q_fixed = per_layer(counts, "question")
    o_layer, o_fixed = per_layer(counts, "ordinary")
    assert q_layer <= o_layer, (q_layer, o_layer)  # equal today: the same path through the engine
    # outside the layers: the ids' host tensor, the position ids, the last logits row (8 ops today; 23 with an
    # all-ones padding mask, which also cost a sync)
    assert q_fixed <= o_fixed + 10, (q_fixed, o_fixed)
    # an unpadded cached forward builds no mask tensor per layer (entry_mask returns before its aranges)
    assert per_layer(counts, "ordinary", "arange")[0] == 0


def test_placement_costs_a_few_ops_per_layer(counts):
    """Per layer: the values' and keys' concatenations into the stacked buffers and the layer's own copy (14 ops
    counting views), not a set per document (it was 34 with 10 documents: a view of every document's keys and values
    in every layer); the re-rotation runs once for all layers of a kind."""
    slope, fixed = per_layer(counts, "placement")
    assert slope <= 16, slope
    assert fixed <= 100, fixed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_in_place_rotation_is_rotate_bit_for_bit(family, dtype):
    """The placement's fused in-place re-rotation equals `kvforge.rope.rotate` bit for bit (partial rotary: phi3)."""
    cfg = tiny_model(family).config
    gen = torch.Generator().manual_seed(1)
    for layer in (0, 1):  # gemma3: a sliding layer's RoPE and a full layer's
        rope = rope_for_layer(cfg, layer)
        keys = (torch.randn(3, 2, 257, rope.head_dim, generator=gen) * 4).to(dtype)
        delta = torch.randint(0, 30000, (257,), generator=gen)
        want = rotate(keys, delta, rope)
        got = keys.clone()
        rotate_(got, delta, rope)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (family, dtype, layer)
