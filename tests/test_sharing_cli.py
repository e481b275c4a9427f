"""`kvforge convert lckv` / `kvforge train lckv` on tiny random models, and their one-line errors (exit 2)."""

from __future__ import annotations

import csv
import json
from importlib.resources import files

import pytest
import torch

from kvforge.cli import main
from kvforge.models import load_tokenizer, tiny_model
from kvforge.sharing import KVSharingForCausalLM
from kvforge.sharing.convert import convert

TEXT = files("kvforge.data").joinpath("example_context.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama (4 layers, SmolLM2's vocabulary) saved with SmolLM2's tokenizer."""
    d = tmp_path_factory.mktemp("llama")
    tiny_model("llama", initializer_range=0.05).save_pretrained(d)
    load_tokenizer("smollm2-135m").save_pretrained(d)
    return d


def run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, the error line): stderr's last line (loading progress bars may come before it)."""
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def test_convert_averages_kv_of_the_layers_that_share(llama_dir, tmp_path, capsys):
    code, _ = run(["convert", "lckv", "--model", str(llama_dir), "--preset", "cla", "--out", str(tmp_path)], capsys)
    assert code == 0
    llama = tiny_model("llama", initializer_range=0.05)
    new = KVSharingForCausalLM.from_pretrained(tmp_path)
    assert new.config.kv_layers == "0_0_2_2"
    s, n = llama.state_dict(), new.state_dict()
    for j in (0, 2):
        for proj in ("k_proj", "v_proj"):
            pair = [s[f"model.layers.{i}.self_attn.{proj}.weight"] for i in (j, j + 1)]
            mean = (pair[0] + pair[1]) / 2
            assert torch.allclose(n[f"model.layers.{j}.self_attn.{proj}.weight"], mean)
    assert "model.layers.1.self_attn.k_proj.weight" not in n
    assert torch.equal(n["model.layers.3.mlp.up_proj.weight"], s["model.layers.3.mlp.up_proj.weight"])


def test_identity_map_converts_to_the_same_model(llama_dir):
    llama = tiny_model("llama", initializer_range=0.05)
    same = convert(llama, "0_1_2_3")
    x = torch.randint(3, 5000, (2, 9))
    with torch.no_grad():
        assert (same(x).logits - llama(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("extra, message", [
    (["--layers", "0_x_2_3"], "malformed layer map entry 'x'"),
    (["--layers", "0_1_2"], "3 entries for a model of 4 layers"),
    (["--preset", "mixattention"], "does not fit 4 layers"),
    (["--preset", "lckv", "--warmup", "3"], "does not fit 4 layers"),
    ([], "give exactly one of --preset"),
])
def test_convert_bad_input_is_one_line_exit_2(llama_dir, tmp_path, capsys, extra, message):
    code, err = run(["convert", "lckv", "--model", str(llama_dir), "--out", str(tmp_path), *extra], capsys)
    assert code == 2 and message in err and err.startswith("kvforge: error: ")


def test_convert_refuses_a_non_llama_model(tmp_path, capsys):
    d = tmp_path / "qwen3"
    tiny_model("qwen3").save_pretrained(d)
    load_tokenizer("smollm2-135m").save_pretrained(d)
    code, err = run(["convert", "lckv", "--model", str(d), "--preset", "cla", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "converts Llama-architecture models" in err and "'qwen3'" in err


@pytest.mark.slow  # a CLI training run end to end (~40 s on 2 cores); `make test-slow`
def test_train_writes_curve_and_model_and_resumes_exactly(llama_dir, tmp_path, capsys):
    model_dir, text = tmp_path / "lckv", tmp_path / "text.txt"
    text.write_text(TEXT)
    assert run(["convert", "lckv", "--model", str(llama_dir), "--preset", "lckv", "--warmup", "0", "--out",
                str(model_dir)], capsys)[0] == 0
    common = ["train", "lckv", "--model", str(model_dir), "--text-file", str(text), "--seq-len", "16",
              "--batch-size", "2", "--save-every", "2", "--device", "cpu", "--num-iterations", "3"]
    assert run([*common, "--steps", "4", "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run([*common, "--steps", "2", "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert run([*common, "--steps", "4", "--out", str(tmp_path / "b")], capsys)[0] == 0  # resumes at step 2

    a, b = (KVSharingForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with (tmp_path / "b" / "loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["ppl_before"] > 0 and metrics["ppl_after"] > 0 and metrics["num_iterations"] == 3
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0


def test_train_refuses_a_plain_model(llama_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code, err = run(["train", "lckv", "--model", str(llama_dir), "--text-file", str(text), "--steps", "1", "--out",
                     str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("kvforge: error: ") and "needs a shared-KV model" in err
