"""Offline word lists and natural text.

- Word lists: the files bundled with `wonderwords` (what RULER draws its keys and words from,
  via `wonderwords.random_word._get_words_from_text_file`), read directly so that sampling uses
  our seeded `random.Random` instead of wonderwords' own global random.
- Essay text: the prose of `pydoc_data.topics` (ships with every CPython, PSF licence) standing in
  for RULER's Paul Graham essays. Titles, indented code / grammar blocks, tables and short
  fragments are dropped; the rest is split into sentences with a regex splitter.
  Note: the text differs between CPython versions, so essay haystacks depend on it.
"""

from __future__ import annotations

import re
from functools import cache, lru_cache
from importlib import resources

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_UNDERLINE = re.compile(r"^\s*([*=\-~^+#])\1{2,}\s*$")


@cache
def wonder_words(kind: str) -> tuple[str, ...]:
    """A wonderwords list (`"noun"`, `"adjective"` or `"verb"`), in file order, stripped, no blanks."""
    text = resources.files("wonderwords.assets").joinpath(f"{kind}list.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip())


def split_sentences(text: str) -> list[str]:
    """Regex sentence splitter (a stand-in for RULER's `nltk.sent_tokenize`)."""
    return [s for s in _SENT_SPLIT.split(text.strip()) if s]


def _prose(text: str) -> float:
    return sum(c.isalpha() or c in " ,.;:'\"()-?!" for c in text) / max(1, len(text))


def _clean_paragraph(block: str) -> list[str]:
    """The prose sentences of one blank-line-separated block of a pydoc topic."""
    lines = [x for x in re.sub(r"(?<=\w-)\n\s*", "", block).split("\n") if x.strip()]  # "non-\nnumeric"
    if not lines or any(_UNDERLINE.match(x) for x in lines):
        return []  # a section title
    text = re.sub(r"\s+", " ", " ".join(x.strip() for x in lines))
    if _prose(text) < 0.85 or any(s in text for s in (">>>", "::=", "|", "+--")):
        return []  # code, grammar rules, tables
    text = re.sub(r"^(\d+\.|\*|-) |\*\*[^*]+:\*\* ?|\[\d+\] ?", "", text)
    return [
        s
        for s in split_sentences(text)
        if 20 <= len(s) <= 300
        and s[0].isupper()
        and s[-1] in ".!?"
        and _prose(s) >= 0.93
        and "magic" not in s.lower()
        and not re.search(r"\b(version|See also)\b", s)
    ]


@lru_cache(maxsize=1)
def essay_paragraphs() -> tuple[tuple[str, ...], ...]:
    """The cleaned prose of `pydoc_data.topics` as paragraphs of sentences (~50k words)."""
    from pydoc_data.topics import topics

    paragraphs = (_clean_paragraph(b) for name in sorted(topics) for b in re.split(r"\n\s*\n", topics[name]))
    return tuple(tuple(p) for p in paragraphs if p)


@lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """Every sentence of `essay_paragraphs()` in order."""
    return tuple(s for p in essay_paragraphs() for s in p)
