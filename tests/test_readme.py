"""The README's examples run as written: every ```python block (in order, one namespace) and the `kvforge
generate` / `kvforge presses` commands, on the embedded model."""

import pathlib
import re
import shlex

import pytest
import torch

from kvforge.cli import main

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run_as_written(smol):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    assert len(ns["answers"]) == 2 and all(isinstance(a, str) for a in ns["answers"])
    stats = ns["cache"].stats()
    assert stats["bytes"] < stats["uncompressed_bytes"]  # the press in plain generate really compressed
    assert ns["out"].shape[1] > ns["input_ids"].shape[1]


def _commands() -> list[list[str]]:
    text = "\n".join(_blocks("bash")).replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("kvforge ") and ("generate" in line.split()[1:2] or line == "kvforge presses"):
            cmds.append(shlex.split(line)[1:])
    return cmds


@pytest.mark.slow  # the CLI commands on the embedded model (~60 s); `kvforge generate` is in test_errors_cli
def test_generate_and_presses_commands_run_as_written(smol, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text("The Dunmore town archive was founded in 1921 by the printer Ada Kell. " * 10)
    cmds = _commands()
    assert len(cmds) >= 3, cmds
    for argv in cmds:
        if argv[0] == "generate":
            argv = [*argv, "--max-new-tokens", "4"]
        assert main(argv) == 0, argv
    assert "snapkv" in capsys.readouterr().out


def test_architecture_examples_run(smol_tokenizer):
    """docs/architecture.md's three examples (a press, a layer kind, a task) run and do what they say."""
    from kvforge import KVCache, get_press
    from kvforge.cache.plan import LAYER_KINDS
    from kvforge.models import tiny_model
    from kvforge.presses.registry import PRESSES

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 3
    model = tiny_model("llama")
    ns: dict = {"model": model}
    try:
        for code in blocks:
            exec(compile(code, "architecture.md", "exec"), ns)  # noqa: S102 - the document's own code
        press = get_press("vnorm", compression_ratio=0.5)
        cache = KVCache(model, press=press)
        ids = torch.tensor([smol_tokenizer("one two three four five six seven eight")["input_ids"]])
        with torch.no_grad():
            model(ids, past_key_values=cache)
        assert cache.stats()["entries"][0] == ids.shape[1] // 2
        with torch.no_grad():
            model(ids, past_key_values=ns["cache"])
        assert all(layer.updates == 1 for layer in ns["cache"].layers)
        samples = ns["echo_samples"](smol_tokenizer, 80, 2)
        assert len(samples) == 2 and samples[0].answers[0][0] in samples[0].context
    finally:
        PRESSES.pop("vnorm", None)
        LAYER_KINDS.pop("note_taking", None)
