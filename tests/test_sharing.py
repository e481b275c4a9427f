"""kvforge.sharing against the definition: the sequential (token-by-token) model. Tiny random fp32 models."""

from __future__ import annotations

import json

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kvforge
from kvforge import KVCache, KVForgeError
from kvforge.cache.window import WindowLayer
from kvforge.models import load_tokenizer, tiny_config, tiny_model
from kvforge.sharing import KVSharingConfig, KVSharingForCausalLM, LayerMap, preset
from kvforge.sharing.modeling import KVView, SharedKV

TOL = 1e-4
WINDOW = 5  # sliding window of the tiny models: smaller than the sequences below, so it matters
LAYERS = 6
# every preset, plus maps with a chain of upward reads, a producer reading another layer, and sliding upward layers
MAPS = {name: str(preset(name, LAYERS)) for name in ("lckv", "cla", "yoco", "mixattention")}
MAPS |= {"lckv-w0": str(preset("lckv", LAYERS, warmup=0)), "chain": "1_2_0_3_5_5", "upward-sliding": "0_2s_2s_3_3_5"}


def llama_kwargs(**overrides) -> dict:
    """tiny_config("llama") with 6 layers and initializer_range 0.05: with its 0.2, fp32 rounding (1e-7) grows past
    1e-4 along the 72-layer dependency chain of 12 tokens through the top layer (float64 agrees to 0.0 there)."""
    d = tiny_config("llama", num_hidden_layers=LAYERS, initializer_range=0.05, vocab_size=512).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        d.pop(k, None)
    return d | overrides


def sharing_model(kv_layers: str, seed: int = 0, attn: str = "sdpa", **overrides) -> KVSharingForCausalLM:
    cfg = KVSharingConfig(**llama_kwargs(**overrides), kv_layers=kv_layers, sliding_window=WINDOW)
    torch.manual_seed(seed)
    model = KVSharingForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def ids(b: int = 2, n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 500, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def definition(model, x: torch.Tensor) -> torch.Tensor:
    """The sequential model: every token through the layers in order (`sequential=True`)."""
    return model(x, sequential=True, use_cache=False).logits


@torch.no_grad()
def prefill_decode(model, x: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of a parallel prefill of `prompt` tokens (exact: iterations = prompt) then one-token decoding."""
    cache = KVCache(model)
    out = [model(x[:, :prompt], past_key_values=cache, sequential=False, num_iterations=prompt).logits]
    out += [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(prompt, x.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", list(MAPS))
def test_prefill_decode_sequential_and_parallel_agree(name):
    model = sharing_model(MAPS[name])
    x = ids()
    ref = definition(model, x)
    with torch.no_grad():
        parallel = model(x, sequential=False, num_iterations=x.shape[1], use_cache=False).logits
    assert (parallel - ref).abs().max() <= TOL
    assert (prefill_decode(model, x, 7) - ref).abs().max() <= TOL
    if not LayerMap.parse(MAPS[name]).has_upward:  # nothing to iterate: one parallel pass is the model
        with torch.no_grad():
            one = model(x, sequential=False, num_iterations=1, use_cache=False).logits
        assert (one - ref).abs().max() <= TOL


def test_too_few_iterations_are_not_exact_and_iterations_converge():
    """The check has teeth: with upward layers, p passes make exactly the first p tokens exact."""
    model = sharing_model(MAPS["lckv"])
    x = ids(n=10)
    ref = definition(model, x)
    with torch.no_grad():
        three = model(x, sequential=False, num_iterations=3, use_cache=False).logits
    err = (three - ref).abs().amax(dim=(0, 2))
    assert err[:3].max() <= TOL and err[3:].min() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "kvforge"])
def test_attention_implementations_agree(attn):
    model = sharing_model(MAPS["mixattention"], attn="sdpa")
    other = sharing_model(MAPS["mixattention"], attn=attn)
    x = ids()
    assert (prefill_decode(other, x, 7) - definition(model, x)).abs().max() <= TOL


@pytest.mark.parametrize("name", ["lckv", "yoco"])
def test_generate_equals_definition_and_left_padding(name):
    """`model.generate` (its own cache replaced by a KVCache) gives the definition's logits at every step, and a
    left-padded batch gives each row what it gives alone."""
    model = sharing_model(MAPS[name])
    x = ids(n=10)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False, num_iterations=10, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    ref = definition(model, out.sequences[:, :-1])[:, 9:]
    assert (torch.stack(out.logits, 1) - ref).abs().max() <= TOL

    short = x[1:, 3:]
    batch = torch.cat([x[:1], torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, num_iterations=10,
                              pad_token_id=0)
        alone = model.generate(short, max_new_tokens=4, do_sample=False, num_iterations=10, pad_token_id=0)
    assert torch.equal(both[1, 10:], alone[0, 7:])


def test_question_after_context_equals_one_prefill():
    """A second multi-token forward on a filled cache (a question after a context) is exact too."""
    model = sharing_model(MAPS["lckv"])
    x = ids(n=14)
    cache = KVCache(model)
    with torch.no_grad():
        a = model(x[:, :8], past_key_values=cache, sequential=False, num_iterations=8).logits
        b = model(x[:, 8:], past_key_values=cache, sequential=False, num_iterations=6).logits
    assert (torch.cat([a, b], 1) - definition(model, x)).abs().max() <= TOL


def buggy_read(monkeypatch):
    """The reference's decode: the upward read of one token gets a zero placeholder prepended and the newest
    producer KV dropped."""
    correct = SharedKV.read

    def read(self, i):
        view, key = correct(self, i)
        if self.map.upward(i) and self.q == 1 and view is not None:
            zero = torch.zeros_like(view.keys[:, :, :1])
            view = KVView(torch.cat([zero, view.keys[:, :, :-1]], 2), torch.cat([zero, view.values[:, :, :-1]], 2),
                          view.slots, view.valid)
        return view, key

    monkeypatch.setattr(SharedKV, "read", read)


def test_the_reference_decode_bug_is_caught(monkeypatch):
    model = sharing_model(MAPS["lckv"])
    x = ids()
    with torch.no_grad():
        parallel = model(x, sequential=False, num_iterations=x.shape[1], use_cache=False).logits
    assert (prefill_decode(model, x, 7) - parallel).abs().max() <= TOL
    buggy_read(monkeypatch)
    # the check of test_prefill_decode_sequential_and_parallel_agree fails on the buggy variant, by far
    assert (prefill_decode(model, x, 7) - parallel).abs().max() > 100 * TOL
    assert (definition(model, x) - parallel).abs().max() > 100 * TOL  # token by token shares the bug


@pytest.mark.parametrize("name", ["lckv", "cla", "yoco", "mixattention"])
def test_kv_bytes_are_the_producers_share_of_dense(name):
    n = 12
    model = sharing_model(MAPS[name])
    dense = tiny_model("llama", num_hidden_layers=LAYERS, vocab_size=512)
    lm = LayerMap.parse(MAPS[name])
    caches = []
    for m in (model, dense):
        cache = KVCache(m)
        with torch.no_grad():
            m(ids(n=n), past_key_values=cache, use_cache=True)
        caches.append(cache.stats()["bytes"])
    tokens = sum(min(n, WINDOW - 1) if lm.sliding[j] else n for j in lm.producers)
    assert caches[0] * LAYERS * n == caches[1] * tokens
    if name in ("lckv", "cla"):
        assert caches[0] * LAYERS == caches[1] * len(lm.producers)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by ops under the mode and still alive, and their peak (CPU; exact, unlike
    torch.profiler's CPU memory events)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(k)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.live:
                s = t.untyped_storage()
                self.live[s._cdata] = (StorageWeakRef(s), s.nbytes())
                self.now += s.nbytes()
        self.peak = max(self.peak, self.now)
        return out


@pytest.mark.parametrize("name", list(MAPS))
def test_a_forward_keeps_no_producer_buffer_the_cache_replaced(name):
    """When a producer writes the cache (a DenseLayer growing into new buffers, a sliding layer moving its window
    into a new buffer), its old buffers and the KV of the new tokens it computed are free before the forward ends.
    They were held until the end (`SharedKV.past`, `SharedKV.new`): at the chunk that grew the cache, every
    producer's old buffers at once."""
    model = sharing_model(MAPS[name])
    lm = LayerMap.parse(MAPS[name])
    cache = KVCache(model, reserve=0)  # so the second chunk grows every dense producer's buffers
    x = ids(n=12)
    with torch.no_grad():
        model(x[:, :6], past_key_values=cache, use_cache=True, sequential=False)  # (lckv: 6 steps would not grow)
    old = {j: StorageWeakRef(cache.layers[j].keys.untyped_storage()) for j in lm.producers}
    new = {}
    hooks = [model.model.layers[j].self_attn.v_proj.register_forward_hook(
        lambda mod, args, out, j=j: new.__setitem__(j, StorageWeakRef(out.untyped_storage())))  # the final pass's
        for j in lm.producers]
    alive = {}
    hooks.append(model.model.layers[-1].register_forward_hook(lambda *_: alive.update(
        old=[j for j in lm.producers if not old[j].expired()], new=[j for j in lm.producers if not new[j].expired()])))
    with torch.no_grad():
        model(x[:, 6:], past_key_values=cache, use_cache=True, sequential=False)
    in_place = [j for j in lm.producers if cache.layers[j].keys.untyped_storage()._cdata == old[j].cdata]
    assert all(isinstance(cache.layers[j], WindowLayer) for j in in_place)  # only a sliding layer appends in place
    for h in hooks:
        h.remove()
    assert alive == {"old": in_place, "new": []}  # every replaced buffer is free; an appended one is the current


def test_chunked_prefill_peak_above_the_kv_is_the_dense_models():
    """Peak bytes of a chunked prefill above the KV buffers it leaves: CLA's was 2.1x the dense model's (the old
    buffers of every producer alive at the chunk that grew them); now the same as dense (one chunk's activations and
    one layer's GQA expansion in SDPA)."""
    kw = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=512,
              num_hidden_layers=8, max_position_embeddings=4096, vocab_size=512)
    dense = tiny_model("llama", **kw)
    dense.set_attn_implementation("sdpa")
    cla = sharing_model(str(preset("cla", 8)), **kw)
    x = ids(b=4, n=256)
    extra = {}
    for name, model in (("dense", dense), ("cla", cla)):
        cache = KVCache(model, reserve=0)
        with torch.inference_mode(), LiveBytes() as live:
            for part in x.split(32, 1):
                model(part, past_key_values=cache, use_cache=True, logits_to_keep=1)
        extra[name] = live.peak - cache.stats()["allocated_bytes"]
    assert 0 < extra["cla"] <= 1.25 * extra["dense"], extra  # 1.07x; 2.1x before


def test_non_producers_have_no_kv_projections_and_round_trip(tmp_path):
    model = sharing_model(MAPS["lckv"])
    with_kv = sorted({int(n.split(".")[2]) for n, _ in model.named_parameters() if "k_proj" in n or "v_proj" in n})
    assert with_kv == LayerMap.parse(MAPS["lckv"]).producers == [0, 4, 5]
    model.save_pretrained(tmp_path)
    loaded = KVSharingForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x, num_iterations=2).logits, model(x, num_iterations=2).logits)
    assert json.loads((tmp_path / "config.json").read_text())["kv_layers"] == MAPS["lckv"]


def test_load_model_finds_the_model_through_the_auto_classes(tmp_path):
    model = sharing_model(MAPS["cla"])
    model.save_pretrained(tmp_path)
    load_tokenizer("smollm2-135m").save_pretrained(tmp_path)
    loaded, _ = kvforge.load_model(str(tmp_path))
    assert type(loaded).__name__ == "KVSharingForCausalLM" and loaded.config._attn_implementation == "kvforge"
    x = ids()
    assert (prefill_decode(loaded, x, 7) - definition(model, x)).abs().max() <= TOL


def test_press_applies_to_producing_layers():
    model = sharing_model(MAPS["lckv"], vocab_size=49152)  # SmolLM2's tokenizer drives it
    smol_tokenizer = load_tokenizer("smollm2-135m")
    press = kvforge.get_press("knorm", compression_ratio=0.5)
    answers, cache = kvforge.generate(model, smol_tokenizer, "A context about harbours and ships. " * 4,
                                      ["Which ships?"], press=press, max_new_tokens=3, return_cache=True)
    entries = cache.stats()["entries"]
    producers = LayerMap.parse(MAPS["lckv"]).producers
    assert [i for i, e in enumerate(entries) if e] == producers
    _, plain = kvforge.generate(model, smol_tokenizer, "A context about harbours and ships. " * 4, ["Which ships?"],
                                max_new_tokens=3, return_cache=True)
    assert all(entries[j] < plain.stats()["entries"][j] for j in producers)


@pytest.mark.parametrize("kv_layers, press, message", [
    (MAPS["lckv"], "h2o", "acts while decoding"),
    (MAPS["lckv"], "kvzip", "extra passes"),
    ("0_2_0_3_3_5", "knorm", "read only by other layers"),
])
def test_presses_that_cannot_apply_are_refused(kv_layers, press, message):
    model = sharing_model(kv_layers)
    cache = KVCache(model, press=kvforge.get_press(press, compression_ratio=0.5))
    with pytest.raises(KVForgeError, match=message):
        model(ids(), past_key_values=cache)


@pytest.mark.parametrize("text, message", [
    ("0_x_2_3_4_5", "malformed layer map entry 'x'"),
    ("0__2_3_4_5", "malformed layer map entry ''"),
    ("", "empty"),
    ("0_1_2_3_4_9", "layer 5 reads layer 9, out of range"),
    ("0_1_2_3_4", "5 entries for a model of 6 layers"),
    ("0s_0_2_3_4_5", "layer 0 is marked sliding"),
])
def test_bad_layer_maps_are_one_line_errors(text, message):
    with pytest.raises(KVForgeError, match=message) as e:
        KVSharingConfig(**llama_kwargs(), kv_layers=text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, layers, kwargs, message", [
    ("cla", 5, {}, "does not fit 5 layers"),
    ("yoco", 7, {}, "does not fit 7 layers"),
    ("lckv", 3, {"warmup": 2}, "needs at least warmup \\+ 2 = 4 layers"),
    ("mixattention", 4, {}, "needs at least 6"),
    ("gqa", 8, {}, "unknown preset 'gqa'"),
])
def test_presets_that_do_not_fit_are_one_line_errors(name, layers, kwargs, message):
    with pytest.raises(KVForgeError, match=message) as e:
        preset(name, layers, **kwargs)
    assert "\n" not in str(e.value)


def test_presets_reproduce_the_reference_configs():
    """The reference's README configs for 22 layers (TinyLlama)."""
    assert str(preset("lckv", 22)) == "0_" + "20_" * 20 + "21"
    assert str(preset("cla", 22)) == "_".join(str(i - i % 2) for i in range(22))
    assert str(preset("yoco", 22)) == "_".join(f"{i}s" for i in range(11)) + "_11" * 11
    assert str(preset("mixattention", 22)) == ("0_1s_1s_3s_3s_3s_0_7s_7s_9s_9s_9s_12_13s_13s_15s_15s_15s_12_19s_"
                                              "19s_19s")
    assert LayerMap.parse(str(preset("lckv", 22))).segments() == [(0, 1, False), (1, 21, True), (21, 22, False)]
