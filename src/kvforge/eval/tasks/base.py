"""The sample type shared by every task, token counting, seeding and the length-fitting loop.

A `Sample` follows NVIDIA kvpress's dataset columns (`context`, `question`, `answer_prefix`,
`answers`, `max_new_tokens`), with the questions that share one context grouped together
("compress once, ask many").
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from kvforge.errors import KVForgeError


@dataclass
class Sample:
    """One context with one or more questions.

    `answers[i]` holds the gold strings of `questions[i]`; `metric` names a function of
    `kvforge.eval.metrics.score`. A perplexity sample has no questions and metric `"ppl"`.
    """

    task: str
    id: str
    context: str
    questions: list[str]
    answer_prefix: str
    answers: list[list[str]]
    max_new_tokens: int
    metric: str
    meta: dict = field(default_factory=dict)


def sample_rng(task: str, seed: int, index: int, part: str = "") -> random.Random:
    """A private `random.Random` per (task, seed, sample index, part); string seeds hash with SHA-512,
    so the stream is the same in every process (unlike `hash()`)."""
    return random.Random(f"{task}:{seed}:{index}:{part}")


_WORDISH = re.compile(r"\w+|[^\w\s]")


class TokenCounter:
    """Counts tokens of a tokenizer (no special tokens). `pieces()` memoizes short strings, so a
    haystack is measured by summing the counts of its pieces instead of re-tokenizing it.

    With `tokenizer=None` a token is a run of word characters or one punctuation mark.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return len(_WORDISH.findall(text))
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def pieces(self, texts: list[str]) -> list[int]:
        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        for i in range(0, len(todo), 4096):
            chunk = todo[i : i + 4096]
            if self.tokenizer is None:
                counts = [len(_WORDISH.findall(t)) for t in chunk]
            else:
                ids = self.tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
                counts = [len(x) for x in ids]
            self.memo.update(zip(chunk, counts))
        return [self.memo[t] for t in texts]

    def piece(self, text: str) -> int:
        return self.pieces([text])[0]


_COUNTERS: dict[int, TokenCounter] = {}


def counter_for(tokenizer) -> TokenCounter:
    """The memoizing counter of `tokenizer` (one per tokenizer object for the life of the process)."""
    c = _COUNTERS.get(id(tokenizer))
    if c is None or c.tokenizer is not tokenizer:
        c = _COUNTERS[id(tokenizer)] = TokenCounter(tokenizer)
    return c


def fit_length(make: Callable[[int], str], count: TokenCounter, length: int, what: str) -> tuple[str, int]:
    """Call `make(target)` (a context whose *estimated* size is `target` tokens, built from counted
    pieces) and move `target` by the measured error (bisecting once over- and undershoots are both
    known) until the exact count is within 1% of `length`. Returns the context and its exact count;
    raises KVForgeError if the best is more than 2% off."""
    if length < 1:
        raise KVForgeError(f"{what}: length must be a positive number of tokens, got {length}")
    target, best, lo, hi = length, None, None, None
    for _ in range(10):
        text = make(target)
        n = count(text)
        if best is None or abs(n - length) < abs(best[1] - length):
            best = (text, n)
        if abs(n - length) <= max(1, length // 100):
            break
        if n < length:
            lo = target if lo is None else max(lo, target)
        else:
            hi = target if hi is None else min(hi, target)
        target += length - n
        if lo is not None and hi is not None:
            if not lo < target < hi:
                target = (lo + hi) // 2
            if target in (lo, hi):
                break
    text, n = best
    if abs(n - length) > 0.02 * length:
        raise KVForgeError(f"{what}: cannot build a context of {length} tokens (got {n}); try a larger length")
    return best


def cumulative(counts: list[int]) -> list[int]:
    """Prefix sums with a leading 0: `out[k]` = tokens of the first k pieces."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out
