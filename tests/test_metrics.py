"""Metrics on hand-made examples."""

import math

import pytest

from kvforge.errors import KVForgeError
from kvforge.eval.metrics import (
    agreement,
    exact_match,
    f1,
    lcs_length,
    normalize_answer,
    perplexity,
    rouge_l,
    score,
    string_match_all,
    string_match_part,
)


def test_string_match_all_and_part():
    pred = "The special magic numbers are 1234567 and 7654321."
    golds = ["1234567", "7654321", "1111111", "2222222"]
    assert string_match_all(pred, golds) == 0.5
    assert string_match_part(pred, golds) == 1.0
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert string_match_part(pred, ["9999999"]) == 0.0 and string_match_all(pred, []) == 0.0


def test_squad_f1_and_exact_match():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # "cat sat on mat" vs "cat sat on hat": 3 common of 4 -> P = R = 0.75
    assert f1("the cat sat on the mat", ["a cat sat on a hat"]) == pytest.approx(0.75)
    assert f1("Paris", ["London", "paris."]) == 1.0  # max over golds
    assert f1("blue green", ["blue"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1("", ["x"]) == 0.0 and f1("the", ["a"]) == 1.0  # both empty after normalization
    assert exact_match("The Cat!", ["cat"]) == 1.0 and exact_match("cats", ["cat"]) == 0.0


def test_rouge_l():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    # LCS 6 of 7 predicted and 6 reference tokens: P = 6/7, R = 1 -> F = 12/13
    assert rouge_l("the cat was found under the bed", ["the cat was under the bed"]) == pytest.approx(12 / 13)
    assert rouge_l("a b", ["c d"]) == 0.0 and rouge_l("Same text.", ["same TEXT"]) == 1.0


def test_agreement_and_perplexity():
    assert agreement("It is 42.", "it is 42") == 1.0
    assert agreement("red car", "blue car") == agreement("blue car", "red car") == pytest.approx(0.5)
    assert perplexity(5 * math.log(10), 5) == pytest.approx(10.0)
    with pytest.raises(KVForgeError):
        perplexity(1.0, 0)


def test_score_dispatch():
    assert score("string_match_all", "x 1 2", ["1", "2", "3", "4"]) == 0.5
    assert score("f1", "the cat sat on the mat", ("a cat sat on a hat",)) == pytest.approx(0.75)
    for bad in ("bleu", "ppl"):
        with pytest.raises(KVForgeError, match="allowed: string_match_all"):
            score(bad, "x", ["x"])
