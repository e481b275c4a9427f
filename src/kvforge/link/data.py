"""Offline data for link tokens: multi-document QA over a generated world, and plain text as documents.

QA (`qa_sample`): facts_qa's fictional world (`kvforge.eval.tasks.facts_qa`); each document holds the facts of one
entity (a person, a company or a city). A single-hop question needs one document (the gold), a two-hop question two
(a person and their employer, or a company and its CEO); the other documents are distractors — namesakes of the gold
entities (same surname or first name, same company stem) and unrelated entities, so every answer's type occurs many
times. Text (`text_sample`): consecutive sentences of `kvforge.eval.tasks.text` as documents, and the next sentence as
the answer ("continue the text"), so training keeps the model's language ability.

A sample becomes one training sequence with KVLink's layout and segment ids (`training_sequence`): loss on the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kvforge.eval.tasks.facts_qa import INSTRUCTION, World
from kvforge.eval.tasks.text import essay_sentences
from kvforge.link.reuse import tokenize
from kvforge.link.tokens import Links

CONTINUE = "Continue the text after the documents with its next sentence."


@dataclass
class LinkSample:
    """Documents, one question and its gold answer strings; `gold`: the indices of the documents it needs."""

    documents: list[str]
    question: str
    answers: list[str]
    gold: list[int]
    kind: str


def question_text(question: str) -> str:
    return f"{INSTRUCTION}\n\nQuestion: {question}"


def qa_sample(rng: random.Random, n_docs: int, gold_position: int | None = None, two_hop: bool = False) -> LinkSample:
    """A multi-document question (see the module docstring). `gold_position`: where the (first) gold document goes
    (default: anywhere); two-hop golds go to random distinct positions unless `gold_position` fixes the first."""
    world = World(rng)
    for _ in range(4):
        world.city()
    company = world.company()
    person = world.person(employer=company.name)
    if two_hop:  # the first gold document must not hold the answer too (no one-document shortcut)
        if rng.random() < 0.5:
            if person.city == company.city:
                person.city = next(c.name for c in world.cities if c.name != company.city)
            q, a, golds = (f"In which city is the company that {person.name} works for headquartered?", company.city,
                           [person, company])
        else:
            ceo = world.person(employer=company.name)
            company.ceo = ceo.name
            if ceo.born == company.founded:
                ceo.born += 1 if ceo.born < 2004 else -1
            q, a, golds = f"In which year was the CEO of {company.name} born?", str(ceo.born), [company, ceo]
    elif rng.random() < 0.6:
        kind = rng.choice(["born", "city", "employer", "colour"])
        q, a = {"born": (f"In which year was {person.name} born?", str(person.born)),
                "city": (f"In which city does {person.name} live?", person.city),
                "employer": (f"Which company does {person.name} work for?", person.employer),
                "colour": (f"What is the favourite colour of {person.name}?", person.colour)}[kind]
        golds = [person]
    else:
        kind = rng.choice(["founded", "hq", "industry"])
        q, a = {"founded": (f"In which year was {company.name} founded?", str(company.founded)),
                "hq": (f"In which city is {company.name} headquartered?", company.city),
                "industry": (f"In which industry is {company.name} active?", company.industry)}[kind]
        golds = [company]
    distractors = []
    while len(distractors) < max(n_docs - len(golds), 0):
        r = rng.random()
        if r < 0.45:
            distractors.append(world.person(like=rng.choice([person] + [g for g in golds if hasattr(g, "born")])))
        elif r < 0.7:
            distractors.append(world.company(like=company))
        elif r < 0.9:
            distractors.append(world.person())
        else:
            distractors.append(world.city())
    docs = [" ".join(e.facts()) for e in distractors]
    rng.shuffle(docs)
    slots = list(range(n_docs))
    first = rng.choice(slots) if gold_position is None else gold_position
    rest = rng.sample([s for s in slots if s != first], len(golds) - 1)
    positions = [first] + rest
    for pos, entity in sorted(zip(positions, golds), key=lambda x: x[0]):
        docs.insert(pos, " ".join(entity.facts()))
    return LinkSample(docs[:n_docs], question_text(q), [a], positions, "two_hop" if two_hop else "single_hop")


def text_sample(rng: random.Random, n_docs: int) -> LinkSample:
    """Consecutive sentences as `n_docs` documents of 1–3 sentences; the answer is the sentence after them."""
    sents = essay_sentences()
    sizes = [rng.randint(1, 3) for _ in range(n_docs)]
    start = rng.randrange(len(sents) - sum(sizes) - 1)
    docs, i = [], start
    for n in sizes:
        docs.append(" ".join(sents[i : i + n]))
        i += n
    return LinkSample(docs, CONTINUE, [sents[i]], [], "text")


def training_sample(rng: random.Random, max_docs: int, text_fraction: float = 0.2,
                    two_hop_fraction: float = 0.3) -> LinkSample:
    """The training mix: text with probability `text_fraction`, else QA (two-hop with `two_hop_fraction`) over
    2..max_docs documents, gold anywhere."""
    n = rng.randint(2, max_docs)
    if rng.random() < text_fraction:
        return text_sample(rng, n)
    return qa_sample(rng, n, two_hop=rng.random() < two_hop_fraction)


def as_prompt(sample: LinkSample, template: bool) -> tuple[list[str], str, str]:
    """(documents, question, answer prefix) as `link.prefill`/`generate` take them. Without a chat template the
    documents end with a blank line and the answer follows "Answer:"."""
    if template:
        return sample.documents, sample.question, ""
    return [d + "\n\n" for d in sample.documents], sample.question, "\nAnswer:"


def training_sequence(tokenizer, sample: LinkSample, links: Links, template: bool, causal: bool = False
                      ) -> tuple[list[int], list[int], list[int]]:
    """(ids, segment ids, labels) of one sample in KVLink's layout: `[prefix][doc 1][links 1]…[prompt][answer eos]`;
    segment k for document k's tokens, 0 elsewhere; labels −100 except the answer (and its end-of-sequence).
    `causal`: the same sample as an ordinary causal sequence instead (`[prefix][doc 1]…[prompt][answer eos]`, no link
    tokens, every segment 0), as the reference trains 60% of its samples."""
    docs, question, prefix = as_prompt(sample, template)
    req = tokenize(tokenizer, docs, [question], template, prefix)
    ids, seg = list(req.prefix), [0] * len(req.prefix)
    for k, doc in enumerate(req.documents):
        extra = [] if causal else links.ids_for(k)
        ids += doc + extra
        seg += [0 if causal else k + 1] * len(doc) + [0] * len(extra)
    ids += req.prompts[0]
    seg += [0] * len(req.prompts[0])
    answer = tokenizer(("" if template else " ") + sample.answers[0], add_special_tokens=False)["input_ids"]
    answer += [tokenizer.eos_token_id]
    labels = [-100] * len(ids) + answer
    return ids + answer, seg + [0] * len(answer), labels


def collate(rows: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: `input_ids`, `segments`, `labels` `[B, T]` and `valid` `[B, T]` (False for padding)."""
    t = max(len(r[0]) for r in rows)
    out = {"input_ids": torch.full((len(rows), t), pad_id), "segments": torch.zeros(len(rows), t, dtype=torch.long),
           "labels": torch.full((len(rows), t), -100), "valid": torch.zeros(len(rows), t, dtype=torch.bool)}
    for i, (ids, seg, lab) in enumerate(rows):
        n = len(ids)
        out["input_ids"][i, :n], out["segments"][i, :n] = torch.tensor(ids), torch.tensor(seg)
        out["labels"][i, :n], out["valid"][i, :n] = torch.tensor(lab), True
    return out
