"""Memory of a compressed prefill, measured on CPU from torch.profiler's allocation events (`capacity.peak_bytes`):
a press frees the KV it removes from the prefill's peak, and a chunked prefill's peak is the kept KV plus one chunk."""

import pytest
import torch

from kvforge import KVCache, get_press
from kvforge.attention.backends import causal_mask
from kvforge.attention.masks import causal_rows, entry_mask
from kvforge.eval.capacity import peak_bytes
from kvforge.generate import prefill
from kvforge.models import tiny_model

CPU = torch.device("cpu")


def test_causal_rows_equal_rows_of_the_full_causal_mask():
    for q, n in [(1, 1), (5, 5), (3, 9), (16, 40)]:
        full = causal_mask(q, n, CPU)
        for rows in ([0], [q - 1], list(range(q)), [1, q - 1] if q > 1 else [0]):
            assert torch.equal(causal_rows(torch.tensor(rows), q, n, CPU), full[:, :, rows])


def test_the_last_query_row_of_a_long_prefill_is_built_alone():
    """`LayerContext.real` asks for the last row of the prefill's mask: 4096² bools (16.8 MB) before the fix."""
    n = 4096
    layer = KVCache(tiny_model("llama")).layers[0]
    layer.update(torch.zeros(1, 2, n, 16), torch.zeros(1, 2, n, 16))
    got = {}
    peak = peak_bytes(lambda: got.setdefault("m", entry_mask(None, layer, n, rows=slice(-1, None))), CPU)
    assert got["m"].shape == (1, 1, 1, n) and bool(got["m"].all())
    assert peak < 16 * n * 8  # a few rows of int64, never n × n


@pytest.fixture(scope="module")
def kv_heavy():
    """KV-heavy shapes (8 layers of 4 KV heads of 32, small MLP), so the KV weighs in what a prefill allocates."""
    return tiny_model("llama", hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                      intermediate_size=512, num_hidden_layers=8, max_position_embeddings=1 << 15, vocab_size=512)


def _peak(model, n, press=None, chunk=None):
    ids = torch.randint(5, 500, (1, n), generator=torch.Generator().manual_seed(n))
    return peak_bytes(lambda: prefill(model, ids, torch.ones_like(ids), KVCache(model, press=press, reserve=0,
                                                                                  chunk_size=chunk)), CPU)


def test_a_press_takes_the_removed_kv_off_the_prefill_peak(kv_heavy):
    n, ratio = 8192, 0.75
    kv = 8 * 2 * 4 * n * 32 * 4  # layers × (k, v) × heads × tokens × head_dim × float32
    none = _peak(kv_heavy, n)
    knorm = _peak(kv_heavy, n, get_press("knorm", compression_ratio=ratio))
    assert none - knorm >= 0.9 * ratio * kv, (none, knorm, kv)  # a q × n mask in `real` (67 MB) broke this
    chunked = _peak(kv_heavy, n, get_press("knorm", compression_ratio=ratio), chunk=512)
    assert chunked < knorm / 2, (chunked, knorm)  # activations of one chunk instead of the whole context


@pytest.mark.slow  # two profiled chunked prefills (~30 s on 2 busy cores)
def test_a_chunked_prefill_grows_by_the_kept_kv(kv_heavy):
    n, ratio = 4096, 0.75
    kv = 8 * 2 * 4 * n * 32 * 4
    chunked = _peak(kv_heavy, n, get_press("knorm", compression_ratio=ratio), chunk=512)
    longer = _peak(kv_heavy, 2 * n, get_press("knorm", compression_ratio=ratio), chunk=512)
    # twice the context adds the kept KV of n more tokens (plus one layer's transient copies of its kept entries and,
    # on CPU, the chunk's materialised causal mask), not the activations of n more tokens
    assert longer - chunked < 2 * (1 - ratio) * kv, (chunked, longer, kv)
