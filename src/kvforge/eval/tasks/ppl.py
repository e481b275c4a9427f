"""Long natural text for perplexity: the prose of `pydoc_data.topics` (see `text.py`), paragraphs
separated by blank lines, starting at a seeded paragraph and cycling; cut at a word to fit `length`.
A sample has no questions and metric `"ppl"` (score with `metrics.perplexity`)."""

from __future__ import annotations

from .base import Sample, counter_for, fit_length, sample_rng
from .text import essay_paragraphs


def ppl_sample(tokenizer, length: int, seed: int = 0, index: int = 0) -> Sample:
    """`length` tokens of natural English text."""
    count = counter_for(tokenizer)
    paragraphs = essay_paragraphs()
    start = sample_rng("ppl", seed, index).randrange(len(paragraphs))

    def make(target: int) -> str:
        out, total, i = [], 0, start
        while True:
            para = paragraphs[i % len(paragraphs)]
            sep = "\n\n" if out else ""
            pieces = [sep + para[0]] + [" " + s for s in para[1:]]
            for piece, c in zip(pieces, count.pieces(pieces)):
                if total + c > target:
                    words = piece.split(" ")
                    cuts = count.pieces([" " + w for w in words[1:]])
                    k = 1 if total + count.piece(words[0]) <= target else 0
                    total += count.piece(words[0]) if k else 0
                    while k and k < len(words) and total + cuts[k - 1] <= target:
                        total += cuts[k - 1]
                        k += 1
                    return "".join(out) + " ".join(words[:k])
                out.append(piece)
                total += c
            i += 1

    text, n_tokens = fit_length(make, count, length, "ppl")
    meta = {"length": length, "n_tokens": n_tokens, "seed": seed, "index": index, "start_paragraph": start}
    return Sample("ppl", f"ppl-{length}-{seed}-{index}", text, [], "", [], 0, "ppl", meta)


def ppl_samples(tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
    """`make_samples("ppl", ...)`."""
    return [ppl_sample(tokenizer, length, seed, i) for i in range(n)]
