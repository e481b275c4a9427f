"""Needle in a haystack over a grid of context lengths x needle depths (as in gkamradt's
LLMTest_NeedleInAHaystack heatmaps), with RULER's needle and template (the `niah_single_2` format:
essay haystack, `adjective-noun` key, 7-digit value, scored with `string_match_all`).

Depth is exact up to one sentence: the needle starts after `depth` x (filler tokens), rounded to
the nearest sentence boundary; depth 0 puts it right after the instruction, depth 1 right before
the question. Sample `index` i carries the same key and value in every cell, so cells differ only by
length and depth.
"""

from __future__ import annotations

from collections import defaultdict

from kvforge.errors import KVForgeError

from .base import Sample, counter_for, cumulative, fit_length, sample_rng
from .ruler import MAX_NEW_TOKENS, NEEDLE, essay_filler, niah_parts, random_value

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def needle_sample(tokenizer, length: int, depth: float, seed: int = 0, index: int = 0) -> Sample:
    """One needle sample of `length` context tokens with the needle at `depth` (0.0-1.0)."""
    if not 0.0 <= depth <= 1.0:
        raise KVForgeError(f"needle depth must be within 0.0-1.0, got {depth}")
    count, rng = counter_for(tokenizer), sample_rng("needle", seed, index)
    key, value = random_value(rng, "words"), random_value(rng, "numbers")
    needle = NEEDLE.format(type_needle_v="numbers", key=key, value=value)
    header, question, prefix = niah_parts("numbers", key, singular=True)
    where = {}

    def make(target: int) -> str:
        sents = essay_filler(count, target - count(header) - count.piece(" " + needle) - 1)
        cum = cumulative(count.pieces([" " + s for s in sents]))
        k = min(range(len(cum)), key=lambda j: abs(cum[j] - depth * cum[-1]))
        where.update(sentence=k, n_sentences=len(sents), filler_tokens=cum[-1], needle_offset=cum[k])
        return header + " ".join(sents[:k] + [needle] + sents[k:]) + "\n"

    context, n_tokens = fit_length(make, count, length, "needle")
    meta = {"length": length, "depth": depth, "n_tokens": n_tokens, "seed": seed, "index": index, "key": key}
    meta.update(where)
    return Sample(
        "needle",
        f"needle-{length}-{depth:g}-{seed}-{index}",
        context,
        [question],
        prefix,
        [[value]],
        MAX_NEW_TOKENS["niah"],
        "string_match_all",
        meta,
    )


def make_needle_grid(
    tokenizer, lengths: list[int], depths: list[float], n_per_cell: int = 1, seed: int = 0
) -> list[Sample]:
    """Samples for every (length, depth) cell, `n_per_cell` each; `meta` holds `length` and `depth`."""
    return [
        needle_sample(tokenizer, length, depth, seed, i)
        for length in lengths
        for depth in depths
        for i in range(n_per_cell)
    ]


def needle_samples(tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
    """`make_samples("needle", ...)`: sample i at depth `DEFAULT_DEPTHS[i % 5]`."""
    return [needle_sample(tokenizer, length, DEFAULT_DEPTHS[i % len(DEFAULT_DEPTHS)], seed, i) for i in range(n)]


def cell_means(samples: list[Sample], scores: list[float]) -> dict[tuple[int, float], float]:
    """Mean score per (length, depth) cell, for a heatmap."""
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for s, x in zip(samples, scores, strict=True):
        cells[(s.meta["length"], s.meta["depth"])].append(x)
    return {cell: sum(v) / len(v) for cell, v in sorted(cells.items())}
