"""Answer metrics: per prediction, in [0, 1].

- `string_match_all` / `string_match_part`: RULER (`scripts/eval/synthetic/constants.py`): the
  fraction of gold strings found (case-insensitive substring) in the prediction / 1 if any is found.
  RULER averages over samples and multiplies by 100; here one prediction gives one value.
- `f1` / `exact_match`: SQuAD v1.1's `evaluate-v1.1.py` (lowercase, drop punctuation and articles
  a/an/the, collapse whitespace; token-bag F1), max over golds; LongBench's `qa_f1_score` is the same.
- `rouge_l`: ROUGE-L F-measure (Lin 2004) on lowercase alphanumeric tokens, as `rouge-score`
  tokenizes without stemming; max over golds.
- `agreement`: F1 between a compressed-cache answer and the uncompressed one.
- `perplexity`: exp(mean negative log-likelihood).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

from kvforge.errors import KVForgeError

_PUNCT = frozenset(string.punctuation)


def _ruler_clean(prediction: str) -> str:
    """RULER's `postprocess_pred`: control characters become newlines, then strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, golds: list[str]) -> float:
    """Fraction of `golds` contained in `prediction` (case-insensitive)."""
    if not golds:
        return 0.0
    pred = _ruler_clean(prediction).lower()
    return sum(g.lower() in pred for g in golds) / len(golds)


def string_match_part(prediction: str, golds: list[str]) -> float:
    """1.0 if any of `golds` is contained in `prediction` (case-insensitive), else 0.0."""
    pred = _ruler_clean(prediction).lower()
    return max((float(g.lower() in pred) for g in golds), default=0.0)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    """Harmonic mean of precision overlap/n_pred and recall overlap/n_ref (0 without overlap)."""
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # SQuAD v2 convention: both empty -> 1, one empty -> 0
        return float(pred == ref)
    return _f_measure(sum((Counter(pred) & Counter(ref)).values()), len(pred), len(ref))


def f1(prediction: str, golds: list[str]) -> float:
    """SQuAD token F1, max over `golds`."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def exact_match(prediction: str, golds: list[str]) -> float:
    """SQuAD exact match after normalization, max over `golds`."""
    return max((float(normalize_answer(prediction) == normalize_answer(g)) for g in golds), default=0.0)


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(prediction: str, gold: str) -> float:
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(gold)
    return _f_measure(lcs_length(pred, ref) if pred and ref else 0, len(pred), len(ref))


def rouge_l(prediction: str, golds: list[str]) -> float:
    """ROUGE-L F-measure, max over `golds`."""
    return max((_rouge_l(prediction, g) for g in golds), default=0.0)


def agreement(prediction: str, reference: str) -> float:
    """Token F1 between two predictions (symmetric): how far a compressed answer drifted from the
    uncompressed one, whatever the gold answer."""
    return _f1(prediction, reference)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of predicted tokens)."""
    if n_tokens <= 0:
        raise KVForgeError(f"perplexity needs at least one token, got n_tokens={n_tokens}")
    return math.exp(nll_sum / n_tokens)


METRICS = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "f1": f1,
    "exact_match": exact_match,
    "rouge_l": rouge_l,
}


def score(metric_name: str, prediction: str, golds: list[str]) -> float:
    """`METRICS[metric_name](prediction, golds)`; unknown names (and "ppl") raise KVForgeError."""
    if metric_name not in METRICS:
        hint = " ('ppl' is scored with perplexity(nll_sum, n_tokens))" if metric_name == "ppl" else ""
        raise KVForgeError(f"unknown metric {metric_name!r}{hint}; allowed: {', '.join(METRICS)}")
    return METRICS[metric_name](prediction, list(golds))
