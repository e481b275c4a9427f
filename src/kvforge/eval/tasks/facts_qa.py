"""Generated multi-document QA with distractors: a stand-in for SQuAD / HotpotQA, which cannot be
downloaded here.

A small fictional world (people, companies, cities with made-up names) is written as short
documents of one-fact sentences. Four questions (by default) ask about a few "core" entities; at
least one is two-hop ("In which city is the company that X works for headquartered?"). The rest of
the context is distractor documents about entities with similar names (shared surnames, company
stems) and the same kinds of attributes, so every answer's type occurs many times. Several
questions share one context: the "compress once, ask many" protocol (KVzip, kvpress pipeline).

Layout: RULER's `qa` template (`Answer the question based on the given documents...`,
`Document {i}:\\n{text}`, answer prefix " Answer:"), split as kvpress does. Scoring:
`string_match_part` (RULER's qa metric: the gold short string appears in the answer,
case-insensitive); golds are exact names / years / colours, so `f1` / `exact_match` also apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvforge.errors import KVForgeError

from .base import Sample, counter_for, fit_length, sample_rng

INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
HEADER = INSTRUCTION + "\n\nThe following are given documents.\n\n"
QUESTION = INSTRUCTION + "\n\nQuestion: {query}"
ANSWER_PREFIX = " Answer:"

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "sh",
    "st",
    "t",
    "tr",
    "v",
    "w",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "nd", "rk", "x")
COMPANY_SUFFIXES = (
    "Systems",
    "Labs",
    "Holdings",
    "Industries",
    "Works",
    "Dynamics",
    "Foods",
    "Logistics",
    "Textiles",
    "Motors",
)
CITY_SUFFIXES = ("", "", "ton", "ford", "burg", "haven", "mouth", "vale")
COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "teal",
    "crimson",
    "amber",
    "violet",
    "indigo",
    "silver",
    "maroon",
    "turquoise",
)
INDUSTRIES = (
    "shipping",
    "software",
    "textile",
    "mining",
    "banking",
    "robotics",
    "farming",
    "pharmaceutical",
    "aviation",
    "publishing",
)


def _name(rng, syllables: int) -> str:
    return ("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)).title()


@dataclass
class Person:
    name: str
    born: int
    city: str
    employer: str
    colour: str

    def facts(self) -> list[str]:
        n = self.name
        return [
            f"{n} was born in {self.born}.",
            f"{n} lives in {self.city}.",
            f"{n} works for {self.employer}.",
            f"The favourite colour of {n} is {self.colour}.",
        ]


@dataclass
class Company:
    name: str
    founded: int
    city: str
    ceo: str
    industry: str

    def facts(self) -> list[str]:
        c = self.name
        return [
            f"{c} was founded in {self.founded}.",
            f"{c} is headquartered in {self.city}.",
            f"The CEO of {c} is {self.ceo}.",
            f"{c} is active in the {self.industry} industry.",
        ]


@dataclass
class City:
    name: str
    population: int
    river: str

    def facts(self) -> list[str]:
        n = self.name
        return [f"{n} has about {self.population:,} inhabitants.", f"{n} lies on the river {self.river}."]


class World:
    """Entities with unique names; `person()` / `company()` / `city()` draw new ones."""

    def __init__(self, rng):
        self.rng, self.names = rng, set()
        self.cities: list[City] = []
        self.companies: list[Company] = []
        self.people: list[Person] = []

    def _unique(self, make, fallback=None) -> str:
        name, tries = make(), 0
        while name in self.names:
            tries += 1
            name = (fallback or make)() if tries > 20 else make()
        self.names.add(name)
        return name

    def city(self) -> City:
        r = self.rng
        c = City(self._unique(lambda: _name(r, 2) + r.choice(CITY_SUFFIXES)), r.randrange(20, 900) * 1000, _name(r, 2))
        self.cities.append(c)
        return c

    def person(self, employer: str | None = None, like: Person | None = None) -> Person:
        r = self.rng

        def make() -> str:
            first, last = _name(r, 2), _name(r, r.choice((2, 3)))
            if like is not None:  # a namesake: same surname, or same first name
                a, b = like.name.split(" ")
                first, last = (first, b) if r.random() < 0.7 else (a, last)
            return f"{first} {last}"

        def fresh() -> str:
            return f"{_name(r, 2)} {_name(r, r.choice((2, 3)))}"

        employer = employer or r.choice(self.companies).name
        name = self._unique(make, fresh)
        p = Person(name, r.randint(1940, 2004), r.choice(self.cities).name, employer, r.choice(COLOURS))
        self.people.append(p)
        return p

    def company(self, like: Company | None = None, ceo: str | None = None) -> Company:
        r = self.rng
        stem = like.name.split(" ")[0] if like is not None else None
        name = self._unique(
            lambda: f"{stem or _name(r, 2)} {r.choice(COMPANY_SUFFIXES)}",
            lambda: f"{_name(r, 2)} {r.choice(COMPANY_SUFFIXES)}",
        )
        ceo = ceo or self._unique(lambda: f"{_name(r, 2)} {_name(r, 2)}")
        c = Company(name, r.randint(1850, 2015), r.choice(self.cities).name, ceo, r.choice(INDUSTRIES))
        self.companies.append(c)
        return c


def _questions(world: World, rng, n: int) -> tuple[list[str], list[list[str]], list, list[str]]:
    """n questions about 2 core people and 2 core companies (with their CEOs); >= 1 two-hop."""
    companies = [world.company() for _ in range(2)]
    ceos = []
    for c in companies:
        ceo = world.person(employer=c.name)
        world.names.discard(c.ceo)
        c.ceo = ceo.name
        ceos.append(ceo)
    people = [world.person(employer=c.name) for c in companies]
    by = {e.name: e for e in companies + people + ceos}
    single = ["born", "city", "employer", "colour", "founded", "ceo"]
    kinds = [rng.choice(["hq_of_employer", "ceo_born"])] + [rng.choice(single) for _ in range(n - 1)]
    questions, answers, needed, asked = [], [], [], set()
    for kind in kinds:
        for _ in range(100):
            p, c = rng.choice(people), rng.choice(companies)
            q = {
                "born": (f"In which year was {p.name} born?", str(p.born), [p]),
                "city": (f"In which city does {p.name} live?", p.city, [p]),
                "employer": (f"Which company does {p.name} work for?", p.employer, [p]),
                "colour": (f"What is the favourite colour of {p.name}?", p.colour, [p]),
                "founded": (f"In which year was {c.name} founded?", str(c.founded), [c]),
                "ceo": (f"Who is the CEO of {c.name}?", c.ceo, [c]),
                "hq_of_employer": (
                    f"In which city is the company that {p.name} works for headquartered?",
                    by[p.employer].city,
                    [p, by[p.employer]],
                ),
                "ceo_born": (f"In which year was the CEO of {c.name} born?", str(by[c.ceo].born), [c, by[c.ceo]]),
            }[kind]
            if q[0] not in asked:
                break
        asked.add(q[0])
        questions.append(q[0])
        answers.append([q[1]])
        needed += [e for e in q[2] if e not in needed]
    return questions, answers, needed, kinds


def facts_qa_sample(tokenizer, length: int, seed: int = 0, index: int = 0, n_questions: int = 4) -> Sample:
    """One multi-document QA context of `length` tokens with `n_questions` questions."""
    count, rng = counter_for(tokenizer), sample_rng("facts_qa", seed, index)
    world = World(rng)
    for _ in range(6):
        world.city()
    questions, answers, needed, kinds = _questions(world, rng, n_questions)
    core = (list(world.cities), list(world.companies), list(world.people), set(world.names))
    rng.shuffle(needed)
    doc_cost = count.piece("Document 10:\n") + count.piece("\n\n")

    def make(target: int) -> str:
        world.cities, world.companies, world.people = list(core[0]), list(core[1]), list(core[2])
        world.names = set(core[3])
        world.rng = sample_rng("facts_qa", seed, index, "distractors")
        docs = [e.facts() for e in needed]
        total = count(HEADER) + sum(doc_cost + sum(count.pieces([" " + f for f in d])) for d in docs)
        budget = target - 2
        if total > budget + 0.02 * target:
            raise KVForgeError(
                f"facts_qa: {n_questions} questions need about {total} tokens; length {target} is too short"
            )
        stalls = 0
        while total < budget and stalls < 50:
            r = world.rng.random()
            if r < 0.6:
                e = world.person(like=world.rng.choice(core[2]) if world.rng.random() < 0.5 else None)
            elif r < 0.85:
                e = world.company(like=world.rng.choice(core[1]) if world.rng.random() < 0.5 else None)
            else:
                e = world.city()
            doc, total = [], total + doc_cost
            for fact, c in zip(e.facts(), count.pieces([" " + f for f in e.facts()])):
                if total + c > budget and (total + c - budget) > (budget - total):
                    break
                doc.append(fact)
                total += c
            if doc:
                docs.append(doc)
            else:
                total, stalls = total - doc_cost, stalls + 1
            if total + 4 >= budget:
                break
        sample_rng("facts_qa", seed, index, "order").shuffle(docs)
        body = "\n\n".join(f"Document {i + 1}:\n" + " ".join(d) for i, d in enumerate(docs))
        return HEADER + body + "\n\n"

    context, n_tokens = fit_length(make, count, length, "facts_qa")
    meta = {
        "length": length,
        "n_tokens": n_tokens,
        "seed": seed,
        "index": index,
        "kinds": kinds,
        "n_documents": len(re.findall(r"^Document \d+:$", context, re.M)),
    }
    return Sample(
        "facts_qa",
        f"facts_qa-{length}-{seed}-{index}",
        context,
        [QUESTION.format(query=q) for q in questions],
        ANSWER_PREFIX,
        answers,
        32,
        "string_match_part",
        meta,
    )


def facts_qa_samples(tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
    """`make_samples("facts_qa", ...)`."""
    return [facts_qa_sample(tokenizer, length, seed, i) for i in range(n)]
