"""The registry is the single source of truth: README table, CLI and test matrix come from it."""

from pathlib import Path

from kvforge.presses.registry import PRESSES, TABLE_BEGIN, TABLE_END, press_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_is_current():
    text = README.read_text(encoding="utf-8")
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    assert text[start:end] == press_markdown(), "README table is stale: run `python -m kvforge.presses.registry`"


def test_every_press_declares_itself():
    for name, cls in PRESSES.items():
        assert cls.name == name
        assert cls.paper, f"{name} cites no paper"
        assert cls.__doc__, f"{name} has no docstring"
        assert cls.kind in {"prefill", "decode", "wrapper", "quantization", "merge", "selection", "channel", "layer"}
