"""kvforge.rope: each family's frequencies as transformers computes them, and cached keys moved exactly."""

import importlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from kvforge import KVForgeError
from kvforge.models import tiny_config
from kvforge.rope import apply, is_nope, rope_for_layer, rotate, unapply

# (family, config overrides): every family, plus the scaled RoPE types (yarn and longrope have attention_scaling ≠ 1)
CASES = {
    "llama": ("llama", {}),
    "llama-llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),  # head_dim 16: high, medium and low frequencies all present
    "llama-yarn": ("llama", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=512))),
    "mistral": ("mistral", {}),
    "mistral-dynamic": ("mistral", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-linear": ("qwen3", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "gemma3": ("gemma3", {}),  # sliding layers base 1e4, full layers base 1e6
    "gemma3-linear-full": ("gemma3", dict(rope_parameters=dict(
        sliding_attention=dict(rope_type="default", rope_theta=10000.0),
        full_attention=dict(rope_type="linear", rope_theta=1000000.0, factor=8.0)))),
    "phi3": ("phi3", {}),  # partial_rotary_factor 0.5: 8 of 16 channels rotated
    "phi3-longrope": ("phi3", dict(original_max_position_embeddings=512, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, factor=4.0,
        short_factor=[1.0, 1.1, 1.3, 1.7], long_factor=[2.0, 3.0, 5.0, 8.0]))),
    # the families added 2026-12-07 (each with its own modeling file; gpt_neox, phi and stablelm partial rotary)
    **{f: (f, {}) for f in ("olmo2", "olmo3", "granite", "granitemoe", "mixtral", "qwen3_moe", "starcoder2",
                            "gpt_neox", "phi", "stablelm")},
    "smollm3": ("smollm3", {}),  # layer 3 is a NoPE layer (no_rope_layers [1, 1, 1, 0])
    "cohere": ("cohere", {}),  # interleaved pairs (2i, 2i + 1)
    "cohere2": ("cohere2", {}),  # interleaved on its sliding layers; its global layer is NoPE
    "glm": ("glm", {}),  # interleaved, on half of head_dim
    "glm4": ("glm4", {}),
    "gemma2": ("gemma2", {}),
    "gpt_oss": ("gpt_oss", {}),  # YaRN (attention_scaling ≠ 1), its own rotate-half arithmetic
    **{f: (f, {}) for f in ("arcee", "apertus", "seed_oss", "hunyuan_v1_dense", "ministral")},
    "ernie4_5": ("ernie4_5", {}),  # interleaved
    "helium": ("helium", {}),  # interleaved
    "exaone4": ("exaone4", {}),  # its global layer is NoPE
}
T, START = 8, 20  # a short sequence at positions START..START+T-1
DELTAS = (13, -17, 30)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    family, overrides = CASES[request.param]
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    return request.param, cfg, model


def cached_keys(model, ids, positions) -> list[torch.Tensor]:
    """The keys `[B, H, T, D]` every layer caches for `ids` at `positions [B, T]`."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions, past_key_values=cache)
    return [layer.keys for layer in cache.layers]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_rotate_moves_cached_keys_exactly(case):
    name, cfg, model = case
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (2, T))
    pos = START + torch.arange(T).expand(2, T)
    base = cached_keys(model, ids, pos)
    shifted = {d: cached_keys(model, ids, pos + d) for d in DELTAS}
    ropes = [rope_for_layer(cfg, i) for i in range(cfg.num_hidden_layers)]
    per_token = torch.tensor(DELTAS * 3)[:T]  # [T]: a different Δ per token
    per_entry = torch.stack([per_token, per_token.flip(0)])[:, None]  # [B, 1, T]: and per row
    for i, rope in enumerate(ropes):
        for d in DELTAS:  # positive and negative, as a python int and as a 0-d tensor
            assert rel(rotate(base[i], d, rope), shifted[d][i]) <= 1e-5, (name, i, d)
            assert rel(rotate(base[i], torch.tensor(d), rope), shifted[d][i]) <= 1e-5, (name, i, d)
        for delta in (per_token, per_entry):
            want = torch.zeros_like(base[i])
            for d in DELTAS:
                want = torch.where((delta == d)[..., None].expand_as(want), shifted[d][i], want)
            assert rel(rotate(base[i], delta, rope), want) <= 1e-5, (name, i, tuple(delta.shape))


def test_frequencies_equal_the_models_rotary_embedding(case):
    name, cfg, model = case
    emb = model.base_model.rotary_emb
    family_apply = importlib.import_module(type(emb).__module__).apply_rotary_pos_emb
    torch.manual_seed(2)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k = torch.randn(2, 2, T, head_dim)
    pos = START + torch.arange(T).expand(2, T)
    for i in range(cfg.num_hidden_layers):
        rope = rope_for_layer(cfg, i)
        if is_nope(cfg, i):  # NoPE (test_rotate_moves_cached_keys_exactly checks the model agrees): the identity
            assert rope.rotary_dim == 0 and torch.equal(apply(k, pos[:, None], rope), k), (name, i)
            continue
        layer_type = (getattr(cfg, "layer_types", None) or [None] * (i + 1))[i]
        layer_type = layer_type if hasattr(emb, f"{layer_type}_inv_freq") else None  # per type: Gemma 3, Olmo 3
        prefix = f"{layer_type}_" if layer_type else ""
        assert torch.equal(rope.inv_freq, getattr(emb, f"{prefix}inv_freq")), (name, i)
        assert rope.attention_scaling == getattr(emb, f"{prefix}attention_scaling"), (name, i)
        cos, sin = emb(k, pos, layer_type) if layer_type else emb(k, pos)
        r = rope.rotary_dim  # Phi and StableLM apply RoPE to the rotary channels only, then concatenate the rest
        _, want = family_apply(k[..., :r], k[..., :r], cos, sin)
        want = torch.cat([want, k[..., r:]], -1)
        assert rel(apply(k, pos[:, None], rope), want) <= 1e-6, (name, i)
        assert rel(unapply(want, pos[:, None], rope), k) <= 1e-6, (name, i)


@pytest.mark.parametrize("name, seq_len", [("mistral-dynamic", 3000), ("phi3-longrope", 600)])
def test_sequence_length_dependent_frequencies_follow_the_model(name, seq_len):
    family, overrides = CASES[name]
    cfg = tiny_config(family, **overrides)
    emb = AutoModelForCausalLM.from_config(cfg).model.rotary_emb
    short = rope_for_layer(cfg, 0)
    emb(torch.zeros(1, 1, cfg.head_dim), torch.tensor([[seq_len - 1]]))  # the model switches frequencies
    long = rope_for_layer(cfg, 0, seq_len=seq_len)
    assert not torch.equal(long.inv_freq, short.inv_freq)
    assert torch.equal(long.inv_freq, emb.inv_freq)


@pytest.mark.parametrize("name", ["llama", "llama-yarn", "gemma3", "phi3-longrope"])
def test_rotate_there_and_back_is_the_identity_and_a_pure_rotation(name):
    family, overrides = CASES[name]
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(3)
    keys = torch.randn(2, 2, T, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        rope = rope_for_layer(cfg, i)
        for delta in (5, -1234, 0.5, torch.randint(-500, 500, (2, 1, T))):
            moved = rotate(keys, delta, rope)
            assert torch.allclose(rotate(moved, -delta, rope), keys, atol=1e-5), (name, i, delta)
            assert torch.allclose(moved.norm(dim=-1), keys.norm(dim=-1), rtol=1e-5), (name, i, delta)
    half = rotate(keys.bfloat16(), 7, rope)
    assert half.dtype == torch.bfloat16 and rel(half.float(), rotate(keys, 7, rope)) < 1e-2


def test_phi3_partial_rotary_leaves_the_other_channels_untouched():
    cfg = tiny_config("phi3")
    rope = rope_for_layer(cfg, 0)
    assert (rope.rotary_dim, rope.head_dim, rope.inv_freq.shape) == (8, 16, (4,))
    keys = torch.randn(1, 2, T, 16)
    moved = rotate(keys, torch.arange(T) + 1, rope)
    assert torch.equal(moved[..., 8:], keys[..., 8:])
    assert not torch.allclose(moved[..., :8], keys[..., :8])
    assert torch.equal(apply(keys, 3, rope)[..., 8:], keys[..., 8:])


def test_bad_input_is_rejected():
    cfg = tiny_config("llama")
    rope = rope_for_layer(cfg, 0)
    keys = torch.randn(2, 2, T, 16)
    with pytest.raises(KVForgeError, match=r"delta of shape \(3,\)"):
        rotate(keys, torch.zeros(3), rope)
    with pytest.raises(KVForgeError, match=r"delta of shape \(4, 1, 1, 1\)"):  # would broadcast the keys up
        rotate(keys, torch.zeros(4, 1, 1, 1), rope)
    with pytest.raises(KVForgeError, match="last dim 32 .* head_dim 16"):
        rotate(torch.randn(1, 2, T, 32), 1, rope)
    with pytest.raises(KVForgeError, match="positions of shape"):
        apply(keys, torch.zeros(3, T), rope)
    with pytest.raises(KVForgeError, match="layer_idx=4"):
        rope_for_layer(cfg, 4)
    with pytest.raises(KVForgeError, match="GPT2Config has no rope_parameters"):
        rope_for_layer(AutoConfig.for_model("gpt2"), 0)
    bad = tiny_config("llama")
    bad.rope_parameters["rope_type"] = "spiral"
    with pytest.raises(KVForgeError, match="rope_type 'spiral' is not supported; allowed: default, linear"):
        rope_for_layer(bad, 0)
    gemma = tiny_config("gemma3")
    gemma.rope_parameters["sliding_attention"] = None
    with pytest.raises(KVForgeError, match="layer 0 has no RoPE parameters"):
        rope_for_layer(gemma, 0)
    assert rope_for_layer(gemma, 2).rotary_dim == 16  # the full layers keep theirs
