"""The cache's public shape: every layer kind built from entries through one constructor and read back through
`entries()`; the per-layer plan as the one place deciding kinds; a press acting (or refused) whatever path the
model came from."""

import gc
import weakref

import pytest
import torch
from helpers import CONTEXT, QUESTIONS
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, GPT2Config

from kvforge import KVCache, KVForgeError, generate, get_press
from kvforge.cache import LAYER_KINDS, DenseLayer, HeadVarlenLayer, PackedHeadLayer, register_layer_kind
from kvforge.cache.codecs import KiviCodec
from kvforge.cache.coded import CodedLayer
from kvforge.config import enable_kvforge_attention, uses_kvforge_attention
from kvforge.models import tiny_config, tiny_model


def _entries(b=2, h=3, n=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d + 1, generator=g)
    slots = torch.stack([torch.randperm(20, generator=g)[:n].sort().values for _ in range(b * h)]).view(b, h, n)
    valid = torch.rand(b, h, n, generator=g) > 0.3
    return keys, values, slots, valid


def _as_sets(keys, values, slots, valid):
    """Valid entries per (row, head) as {slot: (key, value)}: what a layer holds, independent of its layout."""
    out = {}
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            for t in range(keys.shape[2]):
                if valid[b, h, t]:
                    out[(b, h, int(slots[b, h, t]))] = (keys[b, h, t], values[b, h, t])
    return out


@pytest.mark.parametrize("kind", [HeadVarlenLayer, PackedHeadLayer])
def test_per_head_kinds_round_trip_entries(kind):
    keys, values, slots, valid = _entries()
    layer = kind.from_entries(keys, values, slots, valid, logical=25, reserve=3)
    got = _as_sets(*layer.entries())
    want = _as_sets(keys, values, slots, valid)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k][0], want[k][0], rtol=0, atol=0)
        torch.testing.assert_close(got[k][1], want[k][1], rtol=0, atol=0)
    assert layer.get_seq_length() == 25
    assert layer.stored_bytes() == int(valid.sum()) * (4 + 5) * 4


def test_dense_kind_round_trips_and_refuses_invalid_entries():
    keys, values, slots, valid = _entries()
    layer = DenseLayer.from_entries(keys, values, slots, reserve=2)
    k, v, s, ok = layer.entries()
    assert torch.equal(k, keys) and torch.equal(v, values) and torch.equal(s, slots) and bool(ok.all())
    assert layer.get_seq_length() == int(slots.max()) + 1 and layer.capacity == 7 + 2
    contiguous = DenseLayer.from_entries(keys, values)
    assert torch.equal(contiguous.entries()[2][0, 0], torch.arange(7)) and contiguous.get_seq_length() == 7
    with pytest.raises(ValueError, match="per-head layer kind"):
        DenseLayer.from_entries(keys, values, slots, valid)


def test_coded_layer_entries_are_the_decoded_codes_then_the_tail():
    keys, values, slots, _ = _entries(n=12, d=8)
    dense = DenseLayer.from_entries(keys, values, slots)

    def build(k, v, s, valid):  # 16-bit codes are the identity: the coded part must come back exactly
        return KiviCodec.encode(k[:, :, :8], v[:, :, :8], 16, 4, 4), 8

    coded = CodedLayer.from_layer(dense, build)
    k, v, s, ok = coded.entries()
    assert torch.equal(s, slots) and bool(ok.all())
    torch.testing.assert_close(k, keys, rtol=0, atol=0)
    torch.testing.assert_close(v, values, rtol=0, atol=0)


def test_the_plan_decides_layer_kinds_and_a_new_kind_is_one_line():
    cfg = tiny_config("gemma3")
    cache = KVCache(cfg)
    assert cache.plan == list(cfg.layer_types)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "DenseLayer" if t == "full_attention" else "WindowLayer" for t in cfg.layer_types]

    class MarkedLayer(DenseLayer):
        pass

    register_layer_kind("marked", lambda cfg, i, reserve: MarkedLayer(reserve=reserve))
    try:
        plan = ["marked"] + list(cfg.layer_types[1:])
        cache = KVCache(cfg, plan=plan)
        assert isinstance(cache.layers[0], MarkedLayer) and cache.plan == plan
        cfg.kvforge_layer_plan = plan  # a config may carry its own plan
        assert isinstance(KVCache(cfg).layers[0], MarkedLayer)
    finally:
        del LAYER_KINDS["marked"]
    with pytest.raises(KVForgeError, match="unknown layer kind 'nope'"):
        KVCache(tiny_config("llama"), plan=["nope"] * 4)
    with pytest.raises(KVForgeError, match="layer plan of 2 entries for a model of 4 layers"):
        KVCache(tiny_config("llama"), plan=["full_attention"] * 2)


def _stock_model(family="llama"):
    """The tiny model built the way a user would, without kvforge: transformers' default attention."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    assert not uses_kvforge_attention(model)
    return model


def _kept(model, tok, press):
    cache = KVCache(model, press=press)
    ids = torch.tensor([tok(CONTEXT)["input_ids"]])
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache.stats()["entries"], [layer.entries()[2] for layer in cache.layers]


@pytest.mark.parametrize("source", ["from_config", "from_pretrained"])
def test_a_press_on_a_model_loaded_without_kvforge_compresses_as_load_model_does(source, smol_tokenizer, tmp_path):
    model = _stock_model()
    if source == "from_pretrained":
        model.save_pretrained(tmp_path)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = tiny_model("llama")  # same weights (seed 0), switched by kvforge
    press = get_press("snapkv", compression_ratio=0.5)
    entries, slots = _kept(model, smol_tokenizer, press)
    ref_entries, ref_slots = _kept(ours, smol_tokenizer, press)
    assert uses_kvforge_attention(model)
    assert entries == ref_entries and entries[0] < len(smol_tokenizer(CONTEXT)["input_ids"])
    assert all(torch.equal(a, b) for a, b in zip(slots, ref_slots))
    answers = generate(_stock_model(), smol_tokenizer, CONTEXT, QUESTIONS, press=press, max_new_tokens=6)
    assert answers == generate(ours, smol_tokenizer, CONTEXT, QUESTIONS, press=press, max_new_tokens=6)


def test_a_press_on_an_unsupported_family_is_refused():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(KVForgeError, match="unsupported model architecture 'gpt2'"):
        KVCache(model, press=get_press("snapkv", compression_ratio=0.5))
    with pytest.raises(KVForgeError, match="unsupported model architecture 'gpt2'"):
        enable_kvforge_attention(model)


def test_a_press_whose_forward_bypassed_kvforge_attention_is_refused_not_ignored(smol_tokenizer):
    model = _stock_model()
    cache = KVCache(model, press=get_press("knorm", compression_ratio=0.5))
    model.set_attn_implementation("sdpa")  # the user switches it back after building the cache
    ids = torch.tensor([smol_tokenizer(CONTEXT)["input_ids"]])
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(KVForgeError, match="the press did not run"):
            model(ids[:, :1], past_key_values=cache)


def test_no_press_leaves_the_attention_alone_and_matches_dynamic_cache(smol_tokenizer):
    model = _stock_model("qwen3")
    ids = torch.tensor([smol_tokenizer(CONTEXT)["input_ids"]])
    with torch.no_grad():
        ours = model(ids, past_key_values=KVCache(model)).logits
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    assert not uses_kvforge_attention(model)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["snapkv", 0.5, object()])
def test_a_press_that_is_not_a_press_object_is_a_one_line_error(bad):
    with pytest.raises(KVForgeError, match="is not a press object"):
        KVCache(tiny_config("llama"), press=bad)


def _dropped(make_and_use) -> bool:
    """True when the KVCache that `make_and_use()` returns a weak reference to is gone after a collection."""
    ref = make_and_use()
    gc.collect()
    return ref() is None


@pytest.mark.parametrize("attention, press", [("sdpa", None), ("kvforge", None), ("sdpa", "knorm")])
def test_a_dropped_cache_is_freed_after_generate(attention, press):
    """The attention binding must not keep the last cache alive: on a model that runs sdpa (a user's, with no press)
    nothing takes the binding, and a strong reference to it kept the whole cache's memory after `del cache`."""
    model = tiny_model("llama")
    model.set_attn_implementation(attention)  # a press switches it to kvforge's
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))

    def use():
        cache = KVCache(model, press=None if press is None else get_press(press, compression_ratio=0.5))
        model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
        return weakref.ref(cache)

    assert _dropped(use)


def test_a_cache_is_freed_after_a_forward_that_failed_between_update_and_attention():
    """An out-of-memory error inside attention (after the layer's update) leaves the binding set; the cache it names
    must still be freed once the caller drops it (a benchmark's batch search retries after such errors)."""
    def boom(module, query, key, value, attention_mask, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated inside attention)")

    AttentionInterface.register("kvforge_test_boom", boom)
    model = tiny_model("llama")
    model.set_attn_implementation("kvforge_test_boom")
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))

    def use():
        cache = KVCache(model)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            model(ids, past_key_values=cache)
        assert cache.get_seq_length() == 8  # the update ran before attention failed
        return weakref.ref(cache)

    assert _dropped(use)


@pytest.mark.parametrize("increasing", [False, True])
def test_a_prefill_prune_parks_its_slots_until_something_reads_them(increasing):
    """A prune of a contiguous layer (what a prefill press does) parks the kept positions off the device's prefill
    peak (increasing ones as a bit mask on the device, others in host memory); the first read brings back exactly the
    kept positions, and a snapshot taken before that read sees the same tensor (one load, as layers share buffer
    references)."""
    from kvforge.cache.layers import ParkedSlots

    layer = DenseLayer(reserve=4)
    keys, values = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    layer.update(keys, values)
    idx = torch.stack([torch.randperm(10)[:6].sort().values for _ in range(6)]).view(2, 3, 6)
    layer.keep(idx, increasing=increasing)
    parked = layer._slots
    assert isinstance(parked, ParkedSlots) and layer.capacity == 10
    assert (parked.bits is not None) == increasing and (parked.host is not None) != increasing
    if increasing:
        assert parked.bits.dtype == torch.uint8 and parked.bits.shape == (2, 3, 2)  # 10 positions in 2 bytes
    assert torch.equal(layer.keys, keys.gather(2, idx[..., None].expand(2, 3, 6, 8)))
    state = layer.snapshot()
    assert torch.equal(layer.entry_slots(), idx)  # the read that loads them
    assert layer.slots.shape == (2, 3, 10) and not isinstance(layer._slots, ParkedSlots)
    layer.update(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))
    assert torch.equal(layer.entry_slots()[:, :, -1], torch.full((2, 3), 10))
    layer.restore(state)
    assert torch.equal(layer.entry_slots(), idx)  # the snapshot's parked slots: the same loaded tensor
    again = DenseLayer(reserve=4)  # a second prune gathers from the (loaded) slots, not from positions
    again.update(keys, values)
    again.keep(idx)
    again.keep(torch.tensor([1, 3, 5]).expand(2, 3, 3))
    assert torch.equal(again.entry_slots(), idx[:, :, [1, 3, 5]])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_parked_positions_leave_the_device_and_come_back_exactly():
    """On CUDA a prefill prune's kept positions are parked in pinned host memory (nothing of them on the device's
    prefill peak); the device block they came from is reused at once, and the read brings back the kept positions."""
    from kvforge.cache.layers import ParkedSlots

    layer = DenseLayer(reserve=4)
    keys, values = torch.randn(2, 3, 4096, 8, device="cuda"), torch.randn(2, 3, 4096, 8, device="cuda")
    layer.update(keys, values)
    idx = torch.stack([torch.randperm(4096)[:1000].sort().values for _ in range(6)]).view(2, 3, 1000).cuda()
    layer.keep(idx, increasing=True)
    parked = layer._slots
    assert isinstance(parked, ParkedSlots) and parked.bits.device.type == "cpu" and parked.bits.is_pinned()
    torch.zeros(1 << 20, dtype=torch.uint8, device="cuda").fill_(255)  # kernels on reused blocks, after the copy
    assert torch.equal(layer.entry_slots(), idx)

@pytest.mark.parametrize("reserve", [0, 3])
def test_packed_layout_is_each_segments_kept_entries_in_order_then_its_spare_room(reserve):
    """`PackedHeadLayer` packing (offsets from the counts, no scan of the mask) against the definition, built one
    (row, head) segment at a time: its kept entries in position order, then `reserve` zero rows. Fresh random masks
    with an empty and a full segment."""
    g = torch.Generator().manual_seed(reserve)
    for _ in range(3):
        b, h, n, d = 2, 3, 11, 4
        keys, values = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d + 1, generator=g)
        slots = torch.randperm(b * h * n, generator=g).view(b, h, n)
        keep = torch.rand(b, h, n, generator=g) < 0.5
        keep[0, 1] = False
        keep[1, 2] = True
        layer = PackedHeadLayer.from_entries(keys, values, slots, keep, logical=n, reserve=reserve)
        k_want, v_want, s_want, offsets, start = [], [], [], [], 0
        for bi in range(b):
            for hi in range(h):
                idx = keep[bi, hi].nonzero().flatten()
                offsets.append(start)
                start += len(idx) + reserve
                k_want += [keys[bi, hi, idx], torch.zeros(reserve, d)]
                v_want += [values[bi, hi, idx], torch.zeros(reserve, d + 1)]
                s_want.append(slots[bi, hi, idx])
        assert torch.equal(layer.offsets, torch.tensor(offsets))
        assert torch.equal(layer.lengths, keep.sum(-1).flatten().to(torch.int32))
        assert torch.equal(layer.k_flat[:start], torch.cat(k_want))
        assert torch.equal(layer.v_flat[:start], torch.cat(v_want))
        kept = torch.cat([torch.arange(o, o + int(c)) for o, c in zip(offsets, layer.lengths.tolist())])
        assert torch.equal(layer.slots_flat[kept], torch.cat(s_want))
        assert layer.total == int(keep.sum()) and layer.max_len == int(keep.sum(-1).max())
