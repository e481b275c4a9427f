"""Deterministic offline benchmark generators: `make_samples(task, tokenizer, length, n, seed)`.

Every task is a seeded generator `(tokenizer, length, n, seed) -> list[Sample]`; the same seed gives
identical samples, `length` is the context's size in the tokenizer's tokens (within 2%).
"""

from __future__ import annotations

from collections.abc import Callable

from kvforge.errors import KVForgeError

from .base import Sample
from .facts_qa import facts_qa_samples
from .loaders import load_kvpress_file, load_longbench_jsonl
from .needle import cell_means, make_needle_grid, needle_samples
from .ppl import ppl_samples
from .ruler import RULER_TASKS, ruler_generator

TASKS: dict[str, Callable[..., list[Sample]]] = {
    **{name: ruler_generator(name) for name in RULER_TASKS},
    "needle": needle_samples,
    "facts_qa": facts_qa_samples,
    "ppl": ppl_samples,
}


def make_samples(task: str, tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
    """`n` samples of `task` with contexts of `length` tokens of `tokenizer`; unknown task -> KVForgeError."""
    if task not in TASKS:
        raise KVForgeError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    return TASKS[task](tokenizer, length, n, seed)


__all__ = [
    "RULER_TASKS",
    "TASKS",
    "Sample",
    "cell_means",
    "load_kvpress_file",
    "load_longbench_jsonl",
    "make_needle_grid",
    "make_samples",
]
