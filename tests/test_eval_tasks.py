"""Benchmark generators: determinism, context length, needle depth, RULER formats, loaders."""

import collections
import hashlib
import json
import re
import subprocess
import sys

import pytest

from kvforge.errors import KVForgeError
from kvforge.eval.tasks import (
    RULER_TASKS,
    TASKS,
    cell_means,
    load_kvpress_file,
    load_longbench_jsonl,
    make_needle_grid,
    make_samples,
)
from kvforge.eval.tasks.ruler import NOISE

QA_TASKS = [t for t in TASKS if t != "ppl"]


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("length", [500, 2000])
@pytest.mark.parametrize("task", list(TASKS))
def test_length_within_2_percent(smol_tokenizer, task, length):
    for s in make_samples(task, smol_tokenizer, length, 2, seed=0):
        n = n_tokens(smol_tokenizer, s.context)
        assert abs(n - length) <= 0.02 * length, (task, length, n)
        assert s.meta["length"] == length and s.task == task


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_per_seed(smol_tokenizer, task):
    a = make_samples(task, smol_tokenizer, 500, 2, seed=1)
    assert a == make_samples(task, smol_tokenizer, 500, 2, seed=1)
    b = make_samples(task, smol_tokenizer, 500, 2, seed=2)
    assert [s.context for s in a] != [s.context for s in b]
    assert a[0].context != a[1].context  # samples of one call differ too


def test_same_samples_in_a_fresh_process():
    """String-seeded generators do not depend on PYTHONHASHSEED or process state (tokenizer=None
    counts words and punctuation)."""
    code = (
        "import hashlib; from kvforge.eval.tasks import TASKS, make_samples; "
        "print(hashlib.sha256(repr([make_samples(t, None, 2000, 1, 3) for t in TASKS]).encode()).hexdigest())"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    here = hashlib.sha256(repr([make_samples(t, None, 2000, 1, 3) for t in TASKS]).encode()).hexdigest()
    assert out.strip() == here


@pytest.mark.parametrize("task", QA_TASKS)
def test_answers_are_in_the_context(smol_tokenizer, task):
    for s in make_samples(task, smol_tokenizer, 2000, 2, seed=0):
        assert len(s.questions) == len(s.answers) >= 1 and s.max_new_tokens > 0
        for golds in s.answers:
            assert golds and all(g in s.context for g in golds), (task, golds)


def test_unknown_task_is_one_line_listing_the_tasks(smol_tokenizer):
    with pytest.raises(KVForgeError) as e:
        make_samples("niah_single_9", smol_tokenizer, 500, 1)
    msg = str(e.value)
    assert "\n" not in msg and "niah_single_9" in msg
    assert all(t in msg for t in TASKS)


def test_needle_at_requested_depth(smol_tokenizer):
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    samples = make_needle_grid(smol_tokenizer, [2000], depths, n_per_cell=1, seed=0)
    assert [(s.meta["length"], s.meta["depth"]) for s in samples] == [(2000, d) for d in depths]
    for s in samples:
        needle = re.search(r"One of the special magic numbers for \S+ is: \d+\.", s.context)
        header = n_tokens(smol_tokenizer, s.context.split("\n")[0] + "\n")
        start = n_tokens(smol_tokenizer, s.context[: needle.start()])
        filler = n_tokens(smol_tokenizer, s.context) - header - n_tokens(smol_tokenizer, " " + needle.group()) - 1
        # within one sentence (essay sentences are at most 300 characters, < 80 tokens)
        assert abs((start - header) - s.meta["depth"] * filler) <= 40, (s.meta["depth"], start, header, filler)
    assert samples[0].context.split("\n")[1].startswith("One of the special magic numbers")
    assert re.search(r"is: \d+\.\n$", samples[-1].context)
    assert len({s.answers[0][0] for s in samples}) == 1  # same needle in every cell
    means = cell_means(samples, [1.0] * len(samples))
    assert means == {(2000, d): 1.0 for d in depths}


def test_needle_default_depths(smol_tokenizer):
    samples = make_samples("needle", smol_tokenizer, 500, 5)
    assert [s.meta["depth"] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_niah_ruler_templates(smol_tokenizer):
    s = make_samples("niah_single_1", smol_tokenizer, 500, 1)[0]
    key = s.meta["keys"][0]
    assert s.context.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n" + NOISE + "\n"
    )
    assert re.fullmatch(r"[\w' ]+-[\w ]+", key)
    assert f"One of the special magic numbers for {key} is: {s.answers[0][0]}." in s.context
    assert re.fullmatch(r"\d{7}", s.answers[0][0]) and s.context.endswith("\n")
    assert s.questions == [f"What is the special magic number for {key} mentioned in the provided text?"]
    assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert s.metric == "string_match_all" and s.max_new_tokens == 128

    uuid = make_samples("niah_multikey_3", smol_tokenizer, 500, 1)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.answers[0][0])
    assert uuid.context.count("One of the special magic uuids for ") > 3  # a haystack of needles

    mv = make_samples("niah_multivalue", smol_tokenizer, 500, 1)[0]
    key = mv.meta["keys"][0]
    assert mv.context.startswith("Some special magic numbers are hidden")
    assert mv.questions == [f"What are all the special magic numbers for {key} mentioned in the provided text?"]
    assert len(mv.answers[0]) == 4 and mv.context.count(f"for {key} is:") == 4

    mk = make_samples("niah_multikey_1", smol_tokenizer, 500, 1)[0]
    assert mk.context.count("One of the special magic numbers for") == 4 and len(mk.answers[0]) == 1


def test_multiquery_single_and_split_variants(smol_tokenizer):
    one = make_samples("niah_multiquery", smol_tokenizer, 1000, 1, seed=5)[0]
    split = make_samples("niah_multiquery_split", smol_tokenizer, 1000, 1, seed=5)[0]
    keys = one.meta["keys"]
    assert len(one.questions) == 1 and ", and " in one.questions[0] and len(one.answers[0]) == 4
    assert one.answer_prefix.startswith(" The special magic numbers for " + ", ".join(keys[:3]))
    assert split.context == one.context and split.meta["multi_question"] and not one.meta.get("multi_question")
    assert split.answers == [[a] for a in one.answers[0]] and split.answer_prefix == ""
    assert split.questions[0] == (
        f"What is the special magic number for {keys[0]} mentioned in the provided text? "
        f"The special magic number for {keys[0]} mentioned in the provided text is"
    )


def test_vt_chain_resolves_to_the_answer(smol_tokenizer):
    s = make_samples("vt", smol_tokenizer, 2000, 1)[0]
    main = s.context.split("\n\n\n\n")[-1]  # after the one-shot example
    assert main.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.")
    value = re.search(r"assigned the value (\d+)", s.questions[0]).group(1)
    assigned = dict(re.findall(r"^VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5}) ?$", main, re.M))
    chain = [v for v, x in assigned.items() if x == value]
    while len(chain) < len(assigned):
        chain += [v for v, x in assigned.items() if x == f"VAR {chain[-1]}"]
    assert chain == s.answers[0] and len(chain) == 5
    assert s.answer_prefix.endswith(f"5 variables are assgined the value {value}, they are: ")


def test_cwe_and_fwe_answers_are_the_most_frequent(smol_tokenizer):
    for length in (500, 2000, 5000):
        s = make_samples("cwe", smol_tokenizer, length, 1)[0]
        listing = s.context.rstrip("\n").split("\n")[-1]
        counts = collections.Counter(re.findall(r"\d+\. (.+?)(?= \d+\. |$)", listing))
        top = [w for w, _ in counts.most_common(11)]
        assert set(top[:10]) == set(s.answers[0]) and counts[top[9]] > counts[top[10]]
    s = make_samples("fwe", smol_tokenizer, 2000, 1)[0]
    counts = collections.Counter(s.context.split("coded words. ")[1].split())
    ranked = [w for w, _ in counts.most_common(5)]
    assert ranked[0] == "..." and ranked[1:4] == s.answers[0] and counts[ranked[3]] > counts[ranked[4]]


def test_facts_qa(smol_tokenizer):
    s = make_samples("facts_qa", smol_tokenizer, 2000, 1, seed=3)[0]
    assert len(s.questions) == 4 and s.answer_prefix == " Answer:" and s.metric == "string_match_part"
    assert s.meta["kinds"][0] in ("hq_of_employer", "ceo_born") and s.meta["n_documents"] > 10
    assert all(q.endswith("?") and "Question: " in q for q in s.questions)
    assert s.context.startswith("Answer the question based on the given documents.")


def test_ppl_sample(smol_tokenizer):
    s = make_samples("ppl", smol_tokenizer, 1000, 1)[0]
    assert s.metric == "ppl" and s.questions == [] and s.answers == [] and "\n\n" in s.context


def test_load_kvpress_jsonl_and_csv(tmp_path):
    rows = [
        {
            "context": "C1",
            "question": "Q1",
            "answer_prefix": " A:",
            "answers": ["x"],
            "max_new_tokens": 8,
            "task": "niah_single_1",
        },
        {
            "context": "C1",
            "question": "Q2",
            "answer_prefix": " A:",
            "answers": ["y", "z"],
            "max_new_tokens": 16,
            "task": "niah_single_1",
        },
        {
            "context": "C2",
            "question": "Q3",
            "answer_prefix": " A:",
            "answers": ["w"],
            "max_new_tokens": 8,
            "task": "qa_1",
        },
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    samples = load_kvpress_file(tmp_path / "d.jsonl")
    assert [s.questions for s in samples] == [["Q1", "Q2"], ["Q3"]]
    assert samples[0].answers == [["x"], ["y", "z"]] and samples[0].max_new_tokens == 16
    assert [s.metric for s in samples] == ["string_match_all", "string_match_part"]
    header = "context,question,answer_prefix,answers,max_new_tokens\n"
    (tmp_path / "d.csv").write_text(header + "C1,Q1, A:,\"['x', 'y']\",8\nC1,Q2, B:,plain,8\n")
    (s,) = load_kvpress_file(tmp_path / "d.csv", metric="f1")
    assert s.answers == [["x", "y"], ["plain"]] and s.questions == ["Q1 A:", "Q2 B:"] and s.answer_prefix == ""
    with pytest.raises(KVForgeError):
        load_kvpress_file(tmp_path / "d.txt")


def test_load_longbench_jsonl(tmp_path):
    row = {
        "input": "Who?",
        "context": "Passage 1: Ann.",
        "answers": ["Ann"],
        "length": 3,
        "dataset": "hotpotqa",
        "_id": "abc",
        "all_classes": None,
    }
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(row) + "\n")
    (s,) = load_longbench_jsonl(tmp_path / "hotpotqa.jsonl")
    assert s.id == "abc" and s.metric == "f1" and s.max_new_tokens == 32 and s.answers == [["Ann"]]
    assert s.context.endswith("Passage 1: Ann.\n\n") and s.questions[0].endswith("Question: Who?\nAnswer:")


def test_ruler_task_names():
    assert set(RULER_TASKS) == {
        "niah_single_1",
        "niah_single_2",
        "niah_single_3",
        "niah_multikey_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "niah_multivalue",
        "niah_multiquery",
        "niah_multiquery_split",
        "vt",
        "cwe",
        "fwe",
    }
