"""Loaders for local copies of public benchmarks.

- `load_kvpress_file`: NVIDIA kvpress's dataset columns (`context, question, answer_prefix,
  answers, max_new_tokens`, optional `task`), one row per question, saved as .jsonl, .json or .csv
  (parquet needs pyarrow, absent here). Rows with the same context become one `Sample`, as
  kvpress's `evaluate.py` groups them (compress once, ask many).
- `load_longbench_jsonl`: LongBench (Bai et al. 2023) rows `input, context, answers, length,
  dataset, _id`, with LongBench's per-dataset prompt (`config/dataset2prompt.json`, split at the
  end of the context the way kvpress splits it), `max_new_tokens` (`dataset2maxlen.json`) and
  metric (`dataset2metric`: qa_f1 -> `f1`, rouge -> `rouge_l`; classification / count / retrieval
  / code-similarity scorers are not reimplemented and fall back to `string_match_part`).
  The prompts are transcribed from LongBench's config for the English datasets; datasets not
  listed get `context` / `Question: {input}` / " Answer:".
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

from kvforge.errors import KVForgeError

from .base import Sample


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise KVForgeError(f"no such file: {path}")
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # column-oriented: {"context": [...], ...}
            keys = list(data)
            return [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
        return list(data)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise KVForgeError(f"{path}: reading parquet needs pyarrow; convert it to .jsonl or .csv") from None
        return pq.read_table(path).to_pylist()
    raise KVForgeError(f"{path}: unsupported file type {suffix!r}; allowed: .jsonl, .json, .csv, .parquet")


def _answers(value) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = ast.literal_eval(text)
        else:
            return [value]
    return [str(a) for a in value]


def _metric_for(task: str) -> str:
    if task.startswith(("niah", "vt", "cwe", "fwe")):
        return "string_match_all"
    return "string_match_part"


def load_kvpress_file(path: str | Path, metric: str | None = None) -> list[Sample]:
    """Samples from a kvpress-format table; `metric` overrides the one guessed from `task`
    (RULER niah/vt/cwe/fwe -> `string_match_all`, anything else -> `string_match_part`).
    When the questions of one context have different answer prefixes, each prefix is appended
    to its question and `answer_prefix` is empty."""
    path = Path(path)
    rows = _read_rows(path)
    missing = {"context", "question", "answers"} - set(rows[0] if rows else {})
    if missing:
        raise KVForgeError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["context"], []).append(row)
    samples = []
    for i, (context, group) in enumerate(groups.items()):
        task = str(group[0].get("task") or path.stem)
        prefixes = [str(r.get("answer_prefix") or "") for r in group]
        questions = [str(r["question"]) for r in group]
        if len(set(prefixes)) > 1:
            questions, prefixes = [q + p for q, p in zip(questions, prefixes)], [""]
        max_new = max(int(r.get("max_new_tokens") or 0) for r in group) or 128
        samples.append(
            Sample(
                task,
                f"{path.stem}-{i}",
                context,
                questions,
                prefixes[0],
                [_answers(r["answers"]) for r in group],
                max_new,
                metric or _metric_for(task),
                {"source": str(path)},
            )
        )
    return samples


_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
# dataset -> (context part with {context}, question part with {input}, max_new_tokens, metric)
LONGBENCH = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\n",
        "Now, answer the question based on the story asconcisely as you can, using a single phrase if possible. "
        "Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        "f1",
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n',
        " Answer the question based on the above article as concisely as you can, using a single phrase or sentence "
        "if possible. If the question cannot be answered based on the information in the article, write "
        '"unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not '
        "provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
        "f1",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\n",
        "Now, answer the following question based on the above text, only give me the answer and do not output any "
        "other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "f1",
    ),
    **{
        name: (
            _QA + "\n\nThe following are given passages.\n{context}\n\n",
            _QA + "\n\nQuestion: {input}\nAnswer:",
            32,
            "f1",
        )
        for name in ("hotpotqa", "2wikimqa", "musique")
    },
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\n",
        "Now, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\n",
        "Now, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:",
        512,
        "rouge_l",
    ),
    "multi_news": (
        "You are given several news articles. Write a one-page summary of all news. \n\nNews:\n{context}\n\n",
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n",
        "{input}",
        32,
        "f1",
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n",
        "{input}",
        128,
        "rouge_l",
    ),
}


def load_longbench_jsonl(path: str | Path) -> list[Sample]:
    """Samples from a LongBench `.jsonl` file (one question per context)."""
    path = Path(path)
    samples = []
    for i, row in enumerate(_read_rows(path)):
        dataset = str(row.get("dataset") or path.stem).removesuffix("_e")
        ctx_t, q_t, max_new, metric = LONGBENCH.get(
            dataset, ("{context}\n\n", "Question: {input}\nAnswer:", 64, "string_match_part")
        )
        samples.append(
            Sample(
                f"longbench_{dataset}",
                str(row.get("_id", f"{path.stem}-{i}")),
                ctx_t.replace("{context}", row["context"]),
                [q_t.replace("{input}", row.get("input") or "")],
                "",
                [_answers(row["answers"])],
                max_new,
                metric,
                {"length": row.get("length"), "dataset": dataset, "all_classes": row.get("all_classes")},
            )
        )
    return samples
