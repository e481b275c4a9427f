"""Bad input gets one clear line naming the value and what is allowed; the CLI prints it and exits 2."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvforge import KVForgeError, generate, get_press, list_presses
from kvforge.attention.backends import eager, sdpa
from kvforge.cli import main
from kvforge.config import enable_kvforge_attention
from kvforge.models import tiny_model


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unknown_press():
    with pytest.raises(KVForgeError) as e:
        get_press("snapkvv")
    msg = one_line(e)
    assert "'snapkvv'" in msg and "snapkv" in msg and "knorm" in msg


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.5"])
def test_ratio_out_of_range(ratio):
    with pytest.raises(KVForgeError) as e:
        get_press("snapkv", compression_ratio=ratio)
    assert repr(ratio) in one_line(e) and "[0, 1)" in str(e.value)


def test_ratio_and_budget_together():
    with pytest.raises(KVForgeError) as e:
        get_press("knorm", compression_ratio=0.5, budget=100)
    assert "not both" in one_line(e)


@pytest.mark.parametrize("budget", [0, -3, 2.5])
def test_bad_budget(budget):
    with pytest.raises(KVForgeError) as e:
        get_press("knorm", budget=budget)
    assert repr(budget) in one_line(e)


def test_unknown_option_and_scorer():
    with pytest.raises(KVForgeError) as e:
        get_press("snapkv", windowsize=3)
    assert "'windowsize'" in one_line(e) and "window_size" in str(e.value)
    with pytest.raises(KVForgeError) as e:
        get_press("adakv", press="nope")
    assert "'nope'" in one_line(e) and "snapkv" in str(e.value)


def test_context_longer_than_model(smol_tokenizer):
    model = tiny_model("llama", max_position_embeddings=64)
    with pytest.raises(KVForgeError) as e:
        generate(model, smol_tokenizer, "word " * 200, ["q?"], max_new_tokens=8)
    msg = one_line(e)
    assert "maximum of 64 tokens" in msg


def test_unsupported_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(KVForgeError) as e:
        enable_kvforge_attention(model)
    msg = one_line(e)
    assert "gpt2" in msg and "llama" in msg


def test_bad_questions(smol_tokenizer):
    model = tiny_model("llama")
    with pytest.raises(KVForgeError):
        generate(model, smol_tokenizer, ["a", "b"], [["q1"], ["q1", "q2"]])
    with pytest.raises(KVForgeError):
        generate(model, smol_tokenizer, [], ["q"])


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["generate", "--press", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvforge: error: unknown press 'nope'") and "\n" not in err
    assert main(["generate", "--press", "snapkv", "--compression-ratio", "1.2"]) == 2
    assert "1.2" in capsys.readouterr().err
    assert main(["generate", "--press", "snapkv", "--context-file", str(tmp_path / "missing.txt"),
                 "--question", "q?"]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_cli_presses_lists_registry(capsys):
    assert main(["presses"]) == 0
    out = capsys.readouterr().out
    for name in list_presses():
        assert name in out
    assert "query_aware" in out and "frees_memory" in out


def test_cli_generate_on_embedded_model(capsys, smol):
    """The embedded model reads the bundled context: uncompressed it answers in the default (kvpress) prompt format;
    with knorm 0.5 it still answers in the kvforge format and loses the answer in kvpress's (measured: the prompt
    format decides this press's score on this model, which is why every run records it)."""
    q = ["--max-new-tokens", "16", "--question", "Who was the first director of the Harbour Archive?"]
    assert main(["generate", "--press", "knorm", "--compression-ratio", "0"] + q) == 0
    assert "Restrepo" in capsys.readouterr().out
    assert main(["generate", "--press", "knorm", "--compression-ratio", "0.5", "--prompt-format", "kvforge"] + q) == 0
    out = capsys.readouterr().out
    assert "Restrepo" in out
    assert "entries kept per layer:" in out and "uncompressed ->" in out and "(0.50x" in out


@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("per_head", [False, True])
def test_sdpa_backend_matches_eager_twin(q, per_head):
    g = torch.Generator().manual_seed(q + 10 * per_head)
    b, h, groups, n, d = 2, 3, 3, 40, 16
    query = torch.randn(b, h * groups, q, d, generator=g)
    key, value = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    mask = torch.rand(b, h if per_head else 1, q, n, generator=g) > 0.4
    mask[0, 0, 0] = False  # a row with nothing to attend: zeros, never NaN
    fast, slow = sdpa(query, key, value, mask, scale=0.3), eager(query, key, value, mask, scale=0.3)
    assert not torch.isnan(fast).any()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    fast_c = sdpa(query[..., :1, :].expand(b, h * groups, n, d), key, value, None, is_causal=True)
    slow_c = eager(query[..., :1, :].expand(b, h * groups, n, d), key, value, None, is_causal=True)
    torch.testing.assert_close(fast_c, slow_c, rtol=1e-4, atol=1e-5)
