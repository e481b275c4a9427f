"""KV quantization (KIVI, GEAR, KVQuant): packing, byte formula, residual window, accuracy, composition."""

import math

import pytest
import torch
from helpers import CONTEXT, CONTEXTS, FAMILIES, QUESTIONS, greedy_decode

from kvforge import KVForgeError, generate, get_press
from kvforge.cache import KVCache
from kvforge.cache.coded import CodedLayer
from kvforge.cli import build_parser
from kvforge.eval.runner import parse_press
from kvforge.generate import encode_prompt, prefill
from kvforge.kernels.quantize import (
    dequantize_keys,
    dequantize_values,
    low_rank,
    low_rank_svd,
    pack,
    quantize_keys,
    quantize_values,
    unpack,
)
from kvforge.models import tiny_config, tiny_model
from kvforge.presses import LayerContext
from kvforge.presses.kvquant import kmeans_levels
from kvforge.rope import apply, rope_for_layer, unapply


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


def plain(model, tok, contexts, question, n):
    from test_engine import plain_generate

    return plain_generate(model, tok, contexts, question, n)


# -- packing and group quantization ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_size(bits):
    codes = torch.randint(0, 2**bits, (3, 2, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    # bit-planes: element i sits in byte i % nb at bit (i // nb) * bits, nb = 64 * bits / 8 bytes per row
    nb = 64 * bits // 8
    for i in (0, 13, min(nb, 62), 63):
        assert int(packed[0, 0, 0, i % nb]) >> ((i // nb) * bits) & (2**bits - 1) == int(codes[0, 0, 0, i])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_quantization_error_within_half_a_step(bits):
    torch.manual_seed(bits)
    k = torch.randn(2, 3, 64, 32) * torch.linspace(0.1, 5, 32)  # per-channel scales (outlier channels)
    v = torch.randn(2, 3, 64, 32)
    kq, ks, kz = quantize_keys(k, bits, 16)
    vq, vs, vz = quantize_values(v, bits, 16)
    assert ks.shape == (2, 3, 4, 32) and vs.shape == (2, 3, 64, 2)
    kd = dequantize_keys(kq, ks, kz, bits, 16, k.dtype)
    vd = dequantize_values(vq, vs, vz, bits, 16, v.dtype)
    step_k = ks.repeat_interleave(16, dim=2)  # per element: its group's scale
    step_v = vs.repeat_interleave(16, dim=3)
    assert ((kd - k).abs() <= step_k / 2 + 1e-5).all()
    assert ((vd - v).abs() <= step_v / 2 + 1e-5).all()
    # each key channel's group min and max are reproduced (asymmetric quantization is exact at the ends)
    g = k.reshape(2, 3, 4, 16, 32)
    assert torch.allclose(kd.reshape(2, 3, 4, 16, 32).amin(3), g.amin(3), atol=1e-5)


def test_kivi_codes_keys_per_channel_so_an_outlier_channel_keeps_the_others_precise():
    torch.manual_seed(0)
    k = torch.randn(1, 1, 32, 8)
    k[..., 3] *= 100.0  # one outlier channel
    kd = dequantize_keys(*quantize_keys(k, 2, 32), 2, 32, k.dtype)
    err = (kd - k).abs()
    assert err[..., [0, 1, 2, 4, 5, 6, 7]].max() < 1.5  # a per-token scale would be ~100 here
    assert err[..., 3].max() > 5


# -- the layer: residual window, byte formula --------------------------------------------------------------------

def kivi_bytes(m, tail, b, h, d, bits, group, elem=4):
    """Bytes of a KIVI layer: packed codes, key scale+min per (group, channel), value scale+min per (token, group)
    of channels, and the full-precision tail."""
    gv = group if d % group == 0 else d
    codes = 2 * b * h * m * d * bits // 8
    key_meta = 2 * b * h * (m // group) * d * elem
    value_meta = 2 * b * h * m * (d // gv) * elem
    return codes + key_meta + value_meta + 2 * b * h * tail * d * elem


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_byte_count_equals_formula(models, smol_tokenizer, bits):
    model = models["llama"]
    press = get_press("kivi", bits=bits, group_size=8, residual_length=8)
    _, cache = generate(model, smol_tokenizer, CONTEXTS, QUESTIONS[:1], press=press, max_new_tokens=5,
                        return_cache=True)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    total = 0
    for layer in cache.layers:
        assert isinstance(layer, CodedLayer)
        m, tail = layer.codec.m, layer.n
        assert m % 8 == 0 and 8 <= tail < 16
        assert layer.stored_bytes() == kivi_bytes(m, tail, 3, cfg.num_key_value_heads, d, bits, 8)
        total += layer.stored_bytes()
    assert cache.stats()["bytes"] == total
    assert cache.stats()["bytes"] < cache.stats()["uncompressed_bytes"]


def test_residual_window_boundaries():
    """The newest R tokens stay full precision; older ones are coded in whole groups of G; the tail holds
    R..R+G−1 tokens once the layer has R; exactly at R+G a group is coded."""
    r, g = 5, 4
    press = get_press("kivi", bits=4, group_size=g, residual_length=r)
    cfg = tiny_config("llama", num_hidden_layers=1)
    for n in range(0, 20):
        cache = KVCache(cfg)
        cache.layers[0].update(torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16))
        ctx = LayerContext(None, cache, 0, torch.randn(1, 4, max(n, 1), 16), None, None)
        press.compress(ctx)
        layer = cache.layers[0]
        expect = max(0, (n - r) // g * g)
        assert (layer.codec.m, layer.n) == (expect, n - expect)
        for _ in range(9):  # decoding one token at a time
            layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
            total = layer.codec.m + layer.n
            assert layer.codec.m % g == 0 and layer.logical == total
            assert layer.n == total - max(0, (total - r) // g * g)
            if total >= r:
                assert r <= layer.n < r + g


def test_keys_and_slots_follow_the_entries_through_flushes():
    cfg = tiny_config("llama", num_hidden_layers=1)
    cache = KVCache(cfg)
    keys, values = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    cache.layers[0].update(keys, values)
    get_press("kivi", bits=16, group_size=4, residual_length=2).compress(
        LayerContext(None, cache, 0, torch.randn(1, 4, 10, 16), None, None))
    layer = cache.layers[0]
    new = torch.randn(1, 2, 7, 16)
    for i in range(7):
        layer.update(new[:, :, i : i + 1], new[:, :, i : i + 1])
    k, v = layer.full()
    assert torch.equal(k, torch.cat([keys, new], 2)) and torch.equal(v, torch.cat([values, new], 2))
    assert layer.entry_slots()[0, 0].tolist() == list(range(17))


# -- against plain generation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_identity_quantizer_equals_plain_generate(models, smol_tokenizer, family):
    """bits=16 stores entries as they are: through the coded layer, flushes included, the answers are exactly
    plain `generate()`'s, batched (left padding) and alone."""
    model = models[family]
    press = get_press("kivi", bits=16, group_size=4, residual_length=3)
    got = generate(model, smol_tokenizer, CONTEXTS, QUESTIONS[:1], press=press, max_new_tokens=24)
    assert [a[0] for a in got] == plain(model, smol_tokenizer, CONTEXTS, QUESTIONS[0], 24)


def next_logits(model, tok, press):
    ids = torch.tensor([sum(encode_prompt(tok, CONTEXT, QUESTIONS[0]), [])])
    n_ctx = len(encode_prompt(tok, CONTEXT, QUESTIONS[0])[0])
    cache = KVCache(model, press=press)
    with torch.no_grad():
        model(ids[:, :n_ctx], past_key_values=cache, use_cache=True)
        return model(ids[:, n_ctx:], past_key_values=cache, use_cache=True).logits.float()


@pytest.mark.parametrize("name", ["kivi", "gear", "kvquant"])
def test_8bit_logits_within_1e2_of_full_precision(models, smol, smol_tokenizer, name):
    """Next-token logits after the question, with the context quantized to 8 bits (no residual window):
    within 1e-2 of full precision on the tiny Gemma3 (absolute) and on SmolLM2 (relative to the logits' norm;
    its logits reach ~37). The tiny random llama amplifies any key error about 6x (0.17% key error -> 1%
    logits), so it is not the yardstick. 2 bits must do worse: the quantizer really ran."""
    for model, tol, relative in ((models["gemma3"], 1e-2, False), (smol[0], 1e-2, True)):
        full = next_logits(model, smol_tokenizer, None)
        errs = []
        for bits in (8, 2):
            q = next_logits(model, smol_tokenizer, get_press(name, bits=bits, group_size=8, residual_length=0))
            errs.append(((q - full).norm() / full.norm()).item() if relative else (q - full).abs().max().item())
        assert math.isfinite(errs[0]) and errs[0] < tol and errs[1] > 3 * errs[0]


def test_eviction_then_quantization_compose(models, smol_tokenizer):
    model = models["llama"]
    snap = get_press("snapkv", compression_ratio=0.5)
    alone, c_alone = generate(model, smol_tokenizer, CONTEXTS, QUESTIONS[:1], press=snap, max_new_tokens=12,
                              return_cache=True)
    identity = get_press("composed", presses=[get_press("snapkv", compression_ratio=0.5),
                                              get_press("kivi", bits=16, group_size=4, residual_length=2)])
    assert generate(model, smol_tokenizer, CONTEXTS, QUESTIONS[:1], press=identity, max_new_tokens=12) == alone
    both = get_press("composed", presses=[get_press("snapkv", compression_ratio=0.5),
                                          get_press("kivi", bits=2, group_size=4, residual_length=2)])
    _, c_both = generate(model, smol_tokenizer, CONTEXTS, QUESTIONS[:1], press=both, max_new_tokens=12,
                         return_cache=True)
    assert c_both.stats()["entries"] == c_alone.stats()["entries"]  # the same tokens, fewer bits
    layer = c_both.layers[0]
    b, h, _, d = layer._k.shape
    assert layer.stored_bytes() == kivi_bytes(layer.codec.m, layer.n, b, h, d, 2, 4)  # packed bytes of the kept
    assert c_both.stats()["bytes"] < c_alone.stats()["bytes"]
    assert layer.entry_slots()[0, 0].tolist() == c_alone.layers[0].entry_slots()[0, 0].tolist()


def test_coded_entries_refuse_eviction():
    cfg = tiny_config("llama", num_hidden_layers=1)
    cache = KVCache(cfg)
    cache.layers[0].update(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    ctx = LayerContext(None, cache, 0, torch.randn(1, 4, 8, 16), None, None)
    get_press("kivi", bits=4, group_size=4, residual_length=0).compress(ctx)
    with pytest.raises(KVForgeError, match="before the coding press"):
        cache.layers[0].keep(torch.zeros(1, 2, 1, dtype=torch.long))


# -- GEAR and KVQuant -------------------------------------------------------------------------------------------

def test_low_rank_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    a = torch.randn(1, 2, 20, 3) @ torch.randn(1, 2, 3, 12)  # exactly rank 3
    f, g = low_rank(a, 3)
    assert f.shape == (1, 2, 20, 3) and g.shape == (1, 2, 3, 12)
    assert torch.allclose(f @ g, a, atol=1e-4)


@pytest.mark.parametrize("m", [7, 32, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_matches_its_svd_twin(m, dtype):
    """The Gram-matrix factors give the truncated SVD's approximation error on fresh random (noise-like, so
    nearly degenerate) residuals, tall and wide, and its exact product on a matrix of well-separated spectrum."""
    for seed in range(3):
        torch.manual_seed(seed)
        r = torch.randn(2, 3, m, 64).to(dtype)
        a, b = low_rank(r, 4)
        c, d = low_rank_svd(r, 4)
        assert a.shape == c.shape and b.shape == d.shape and a.dtype == dtype
        err, ref = [(r.float() - (f.float() @ g.float())).norm(dim=(-2, -1)) for f, g in ((a, b), (c, d))]
        assert torch.isfinite(err).all()
        assert torch.allclose(err, ref, rtol=1e-3 if dtype == torch.bfloat16 else 1e-5)
        scales = torch.tensor([8.0, 4.0, 2.0, 1.0])  # rank 4 with a clear gap, plus small noise
        s = (torch.randn(2, 3, m, 4) * scales) @ torch.linalg.qr(torch.randn(2, 3, 64, 4))[0].transpose(-1, -2)
        s = s + 1e-3 * torch.randn_like(s)
        f, g = low_rank(s, 4)
        h, k = low_rank_svd(s, 4)
        assert torch.allclose(f @ g, h @ k, atol=1e-4)
    z0, z1 = low_rank(torch.randn(1, 1, 5, 8), 0)
    assert z0.shape == (1, 1, 5, 0) and z1.shape == (1, 1, 0, 8)


def codec_error(press, keys, values):
    cache = KVCache(tiny_config("llama", num_hidden_layers=1))
    cache.layers[0].update(keys, values)
    press.compress(LayerContext(None, cache, 0, torch.randn(1, 4, keys.shape[2], 16), None, None))
    k, v = cache.layers[0].full()
    return (k - keys).norm() / keys.norm(), (v - values).norm() / values.norm(), cache.layers[0]


def test_gear_outliers_exact_and_error_below_kivi():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    keys[0, 0, 5, 3] = 40.0  # an outlier element
    kivi_k, kivi_v, _ = codec_error(get_press("kivi", bits=2, group_size=16, residual_length=0), keys, values)
    gear_k, gear_v, layer = codec_error(get_press("gear", bits=2, group_size=16, residual_length=0), keys, values)
    assert gear_k < kivi_k and gear_v < kivi_v
    assert layer.full()[0][0, 0, 5, 3] == 40.0  # kept exactly


def test_kvquant_rope_inverse_round_trip_every_family():
    for family in FAMILIES:
        cfg = tiny_config(family)
        for layer in range(cfg.num_hidden_layers):
            rope = rope_for_layer(cfg, layer)
            x = torch.randn(2, 2, 9, cfg.get_text_config().head_dim or 16)
            pos = torch.randint(0, 500, (2, 2, 9))
            back = apply(unapply(x, pos, rope), pos, rope)
            assert torch.allclose(back, x, atol=1e-5), (family, layer)


def test_kvquant_keeps_sinks_and_outliers_exact_and_fits_non_uniform_levels():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    keys[0, 1, 30, 7] = 50.0
    _, _, layer = codec_error(get_press("kvquant", bits=2, group_size=16), keys, values)
    k, v = layer.full()
    assert torch.allclose(k[:, :, 0], keys[:, :, 0], atol=1e-5)  # the sink token, every channel
    assert torch.allclose(v[:, :, 0], values[:, :, 0])
    # the outlier is exact before RoPE (where KVQuant quantizes; RoPE then mixes it with its channel pair)
    rope = rope_for_layer(tiny_config("llama"), 0)
    pos = torch.arange(64).expand(1, 2, 64)
    pre_k, pre_true = (unapply(x, pos, rope) for x in (k, keys))
    assert abs(pre_k[0, 1, 30, 7] - pre_true[0, 1, 30, 7]) < 1e-4
    # non-uniform levels: on Gaussian data the fitted codebook beats uniform levels
    x = torch.randn(20000).clamp(-3, 3) / 3
    lv = kmeans_levels(x, 4)
    uniform = torch.linspace(-1, 1, 4)

    def err(c):
        return (x - c[(x[:, None] - c).abs().argmin(-1)]).pow(2).mean()

    assert err(lv) < 0.8 * err(uniform)
    rows = torch.stack([x, x.flip(0) * 0.5, x.clamp(0, 1)])  # one codebook per row: each as if fitted alone
    assert torch.allclose(kmeans_levels(rows, 4), torch.stack([kmeans_levels(r, 4) for r in rows]), atol=1e-5)


# -- bad input and the CLI / eval specs ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kivi", "gear", "kvquant"])
def test_bad_quantizer_options_are_rejected(name):
    with pytest.raises(KVForgeError, match="bits=3"):
        get_press(name, bits=3)
    with pytest.raises(KVForgeError, match="compression_ratio must be 0"):
        get_press(name, compression_ratio=0.5)
    with pytest.raises(KVForgeError, match="group_size=0"):
        get_press(name, group_size=0)


def test_specs_compose_and_quantizers_run_once():
    make = parse_press("snapkv+kivi@bits=4@residual_length=16")
    press = make(0.5)
    assert press.name == "composed" and press.presses[0].compression_ratio == 0.5
    assert press.presses[1].bits == 4 and press.presses[1].residual_length == 16
    assert not make.ratio_free and parse_press("kivi@bits=2").ratio_free
    with pytest.raises(KVForgeError, match="key=value"):
        parse_press("kivi@bits")
    with pytest.raises(KVForgeError, match="no option"):
        parse_press("kivi@colour=2")


def test_cli_quant_flags(capsys):
    from kvforge.cli import _press_from_args

    p = build_parser()
    args = p.parse_args(["generate", "--press", "snapkv", "--compression-ratio", "0.5", "--quant", "kivi",
                         "--bits", "2"])
    press = _press_from_args(args)
    assert [q.name for q in press.presses] == ["snapkv", "kivi"] and press.presses[1].bits == 2
    with pytest.raises(KVForgeError, match="not a quantizer"):
        _press_from_args(p.parse_args(["generate", "--quant", "snapkv"]))
    with pytest.raises(KVForgeError, match="needs --quant"):
        _press_from_args(p.parse_args(["generate", "--bits", "2"]))


def test_fused_decode_and_graph_mode_equal_the_decoded_path(models, smol_tokenizer):
    """Decoding straight from the KIVI codes (the fused kernel's twin on CPU; the Triton kernel on CUDA) and
    graph mode (static tail, device-side lengths) give the tokens of the plain path that decodes the codes to
    full precision and runs eager attention — over enough steps that groups leave the residual window and are
    coded while decoding (graph mode runs those steps eagerly), ending with the same codes and tail."""
    from kvforge.attention.function import use_backend

    model = models["llama"]
    ids = torch.tensor([sum(encode_prompt(smol_tokenizer, CONTEXT, QUESTIONS[0]), [])])
    tokens, layers = {}, {}
    for mode in ("decoded", "fused", "graph"):
        cache = KVCache(model, press=get_press("kivi", bits=4, group_size=4, residual_length=16), reserve=32)
        logits = prefill(model, ids, torch.ones_like(ids), cache)
        layer = cache.layers[0]
        assert isinstance(layer, CodedLayer) and layer.codec.m > 0 and layer.fused()
        m0 = layer.codec.m
        with use_backend("eager" if mode == "decoded" else "sdpa"):
            tokens[mode] = greedy_decode(model, cache, logits, ids.shape[1], 22, graph=mode == "graph")
        layers[mode] = cache.layers[0]
        assert layers[mode].codec.m >= m0 + 16  # coded 4+ groups while decoding
    assert tokens["fused"] == tokens["decoded"] and tokens["graph"] == tokens["decoded"]
    eager, graph = layers["decoded"], layers["graph"]
    assert graph.codec.m == eager.codec.m and graph.n == eager.n
    for a, b in zip(graph.codec.parts, eager.codec.parts):
        assert torch.equal(a, b)
    assert torch.equal(graph.keys, eager.keys) and torch.equal(graph.values, eager.values)


@pytest.mark.parametrize("spec", [
    ("gear", {"bits": 2, "group_size": 4, "residual_length": 16}),
    ("kvquant", {"bits": 2, "group_size": 4}),
    ("think", {"compression_ratio": 0.5}),
    ("minicache", {}),
], ids=lambda s: s[0])
def test_graph_mode_of_codes_the_kernel_cannot_read_equals_eager_decode(models, smol_tokenizer, spec):
    """GEAR, KVQuant, channel-pruned (ThinK) and merged (MiniCache) layers in graph mode: the code decoded inside
    the step and the static tail masked by its device-side length give the tokens of eager decoding (which
    attends over `full()`), over enough steps that the streaming codecs code groups while decoding (graph mode
    runs those steps eagerly), ending with the same codes and tail."""
    name, kwargs = spec
    model = models["llama"]
    ids = torch.tensor([sum(encode_prompt(smol_tokenizer, CONTEXT, QUESTIONS[0]), [])])
    tokens, layers = {}, {}
    for mode in ("eager", "graph"):
        cache = KVCache(model, press=get_press(name, **kwargs), reserve=32)
        logits = prefill(model, ids, torch.ones_like(ids), cache)
        coded = [layer for layer in cache.layers if isinstance(layer, CodedLayer)]
        assert coded and not any(layer.fused() for layer in coded)
        m0 = coded[-1].codec.m
        tokens[mode] = greedy_decode(model, cache, logits, ids.shape[1], 22, graph=mode == "graph")
        layers[mode] = [layer for layer in cache.layers if isinstance(layer, CodedLayer)]
        if name in ("gear", "kvquant"):
            assert layers[mode][-1].codec.m >= m0 + 16  # coded 4+ groups while decoding
    assert tokens["graph"] == tokens["eager"]
    for g, e in zip(layers["graph"], layers["eager"]):
        assert g.codec.m == e.codec.m and g.n == e.n
        # masked SDPA over the block rounds differently from eager attention over `full()` (fp32): the new
        # tokens' K/V differ in the last bits, so compare what the codes decode to, not their bits
        for a, b in zip(g.full(), e.full()):
            assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["kivi", "gear", "kvquant", "think"])
def test_captured_graph_decode_of_codes_equals_eager_decode_on_cuda(name):
    """On CUDA the graph-mode step of every coded layer kind is captured (no host read inside it) and replays
    to the tokens of eager decoding, coding steps included (fp32: argmax ties are not a rounding question)."""
    from helpers import captured_codes_match_eager

    assert captured_codes_match_eager(name)


def test_graph_codes_switch_falls_back_to_eager_answers(models, smol_tokenizer, monkeypatch):
    """`KVFORGE_GRAPH_CODES=0` refuses graph mode for codes the kernel cannot read; `generate(cuda_graph=True)`
    then answers through the eager path, with the same answers."""
    from kvforge.cache.graphs import GraphDecoder

    press = get_press("gear", bits=4, group_size=4, residual_length=16)
    kwargs = dict(press=press, max_new_tokens=6, cuda_graph=True)
    fast = generate(models["llama"], smol_tokenizer, CONTEXT, QUESTIONS[:1], **kwargs)
    monkeypatch.setenv("KVFORGE_GRAPH_CODES", "0")
    cache = KVCache(models["llama"], press=press, reserve=16)
    ids = torch.tensor([sum(encode_prompt(smol_tokenizer, CONTEXT, QUESTIONS[0]), [])])
    prefill(models["llama"], ids, torch.ones_like(ids), cache)
    with pytest.raises(KVForgeError, match="KVFORGE_GRAPH_CODES=0"):
        GraphDecoder(models["llama"], cache, ids.shape[1], 4, 1)
    assert generate(models["llama"], smol_tokenizer, CONTEXT, QUESTIONS[:1], **kwargs) == fast
