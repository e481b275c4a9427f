"""RULER's synthetic tasks (Hsieh et al. 2024, github.com/NVIDIA/RULER), regenerated offline.

Templates, needle formats, value types and task parameters follow RULER's
`scripts/data/synthetic/constants.py`, `niah.py`, `variable_tracking.py`,
`common_words_extraction.py`, `freq_words_extraction.py` and `synthetic.yaml`. Each prompt is split
the way NVIDIA kvpress splits its `ruler` dataset: `context` = everything up to the question
(instruction + haystack + "\\n"), `question`, `answer_prefix`. Scoring: `string_match_all`.

Differences from RULER, all forced by running offline or by the length contract:
- the "essay" haystack is the prose of `pydoc_data.topics`, not Paul Graham's essays;
- `length` counts the context only (RULER fits prompt + answer into max_seq_length); to land
  within 2%, the last filler line of a noise haystack may be cut at a sentence, and the filler
  needles of a needle haystack are redrawn until their total fits;
- the few-shot example of `vt` is ~length/4 tokens (RULER: 500) so that short contexts fit;
- sentences are split with a regex instead of nltk, and empty chunks (needle at depth 0) do not
  leave a double space.
"""

from __future__ import annotations

import string
import uuid
from dataclasses import dataclass

from kvforge.errors import KVForgeError

from .base import Sample, TokenCounter, counter_for, fit_length, sample_rng
from .text import essay_sentences, wonder_words

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's own spelling.
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assgined the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))


@dataclass(frozen=True)
class Niah:
    """One row of RULER's `synthetic.yaml` for the niah task."""

    haystack: str  # noise | essay | needle
    type_k: str  # words | numbers | uuids
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH_TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", num_v=4),
    "niah_multiquery": Niah("essay", "words", "numbers", num_k=4, num_q=4),
}


def random_value(rng, kind: str) -> str:
    """RULER's `generate_random`: 7-digit number, `adjective-noun` word, or UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":  # uniform over RULER's sorted(set(adj-noun)) list, without building its 6M entries
        return f"{rng.choice(wonder_words('adjective'))}-{rng.choice(wonder_words('noun'))}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def niah_parts(type_v: str, query: str, singular: bool) -> tuple[str, str, str]:
    """(context header, question, answer prefix) of RULER's niah template; with one answer RULER
    rewrites the template to the singular ('Some'->'A', 'are all'->'is', 'are'->'is')."""
    full = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
    if singular:
        full = full.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        type_v = type_v[:-1]
    full = full.replace("{type_needle_v}", type_v).replace("{query}", query)
    header, rest = full.split("{context}\n")
    cut = rest.index("?") + 1
    return header, rest[:cut], rest[cut:]


def essay_filler(count: TokenCounter, budget: int) -> list[str]:
    """Essay sentences (cycling) totalling about `budget` tokens when joined by spaces; the last one
    is cut at a word, as RULER cuts its essay at a word count."""
    sents = essay_sentences()
    counts = count.pieces([" " + s for s in sents])
    out, total, i = [], 0, 0
    while total + counts[i % len(sents)] <= budget:
        out.append(sents[i % len(sents)])
        total += counts[i % len(sents)]
        i += 1
    words = sents[i % len(sents)].split(" ")
    k, wc = 0, count.pieces([" " + w for w in words])
    while k < len(words) and total + wc[k] <= budget:
        total += wc[k]
        k += 1
    return out + ([" ".join(words[:k])] if k else [])


def noise_filler(count: TokenCounter, budget: int, line: str = NOISE, sep: str = "\n") -> list[str]:
    """Repeated noise lines totalling about `budget` tokens; the last may stop after any of its sentences."""
    per = count.piece(line + sep)
    out = [line] * max(0, budget // per)
    rest = budget - per * len(out)
    parts = line.split(". ")
    options = [(abs(rest - count.piece(". ".join(parts[:k]) + "." + sep)), k) for k in range(1, len(parts))]
    err, k = min(options)
    if err < rest:
        out.append(". ".join(parts[:k]) + ".")
    return out


def needle_filler(count: TokenCounter, budget: int, rng, type_k: str, type_v: str, avoid: set) -> list[str]:
    """RULER's "needle" haystack: random needles; lines are redrawn until the total is within 1%."""

    def draw(k: int) -> list[str]:
        lines = []
        while len(lines) < k:
            key = random_value(rng, type_k)
            if key not in avoid:
                lines.append(NEEDLE.format(type_needle_v=type_v, key=key, value=random_value(rng, type_v)))
        return lines

    probe = draw(16)
    per = sum(count.pieces([x + "\n" for x in probe])) / 16
    lines = draw(max(1, round(budget / per)))
    counts = count.pieces([x + "\n" for x in lines])
    err = sum(counts) - budget
    for _ in range(100):
        if abs(err) <= max(1, budget // 200):
            break
        cands = draw(32)
        for cand, c in zip(cands, count.pieces([x + "\n" for x in cands])):
            j = rng.randrange(len(lines))
            if abs(err - counts[j] + c) < abs(err):
                err += c - counts[j]
                lines[j], counts[j] = cand, c
    return lines


def insert_at_depths(sents: list[str], needles: list[str], depths: list[int]) -> str:
    """RULER's essay insertion: needle i goes before sentence int(len(sents) * depth_i / 100)."""
    pos = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
    parts = []
    for i in range(1, len(pos)):
        parts.append(" ".join(sents[pos[i - 1] : pos[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(p for p in parts if p)


def insert_at_lines(lines: list[str], needles: list[str], rng) -> str:
    """RULER's noise/needle-haystack insertion: needles at random line indices, joined by newlines."""
    if len(lines) < len(needles):
        raise KVForgeError(f"a haystack of {len(lines)} lines cannot hold {len(needles)} needles; use a larger length")
    lines = list(lines)
    for index, needle in zip(sorted(rng.sample(range(len(lines)), len(needles)), reverse=True), needles):
        lines.insert(index, needle)
    return "\n".join(lines)


def niah_sample(task: str, tokenizer, length: int, seed: int, index: int) -> Sample:
    """One RULER niah sample (`niah.py::generate_input_output`), fitted to `length` context tokens."""
    cfg = NIAH_TASKS[task]
    count, rng = counter_for(tokenizer), sample_rng(task, seed, index)
    keys, values, needles = [], [], []
    for _ in range(cfg.num_k):
        key = random_value(rng, cfg.type_k)
        while key in keys:
            key = random_value(rng, cfg.type_k)
        keys.append(key)
        values.append([random_value(rng, cfg.type_v) for _ in range(cfg.num_v)])
        needles += [NEEDLE.format(type_needle_v=cfg.type_v, key=key, value=v) for v in values[-1]]
    rng.shuffle(needles)
    queried = rng.sample(range(cfg.num_k), cfg.num_q)
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    header, question, prefix = niah_parts(cfg.type_v, query, cfg.num_q * cfg.num_v == 1)
    depths = rng.sample(DEPTHS, len(needles))

    def make(target: int) -> str:
        fill_rng = sample_rng(task, seed, index, "haystack")
        budget = target - count(header) - sum(count.pieces([" " + x for x in needles])) - 1
        if cfg.haystack == "essay":
            return header + insert_at_depths(essay_filler(count, budget), needles, depths) + "\n"
        if cfg.haystack == "noise":
            lines = noise_filler(count, budget)
        else:
            lines = needle_filler(count, budget, fill_rng, cfg.type_k, cfg.type_v, set(keys))
        return header + insert_at_lines(lines, needles, fill_rng) + "\n"

    context, n_tokens = fit_length(make, count, length, task)
    meta = {"length": length, "n_tokens": n_tokens, "seed": seed, "index": index, "keys": queries}
    if cfg.haystack == "essay":
        meta["depths"] = sorted(depths)
    answers = [v for i in queried for v in values[i]]
    return Sample(
        task,
        f"{task}-{length}-{seed}-{index}",
        context,
        [question],
        prefix,
        [answers],
        MAX_NEW_TOKENS["niah"],
        "string_match_all",
        meta,
    )


def niah_multiquery_split(tokenizer, length: int, seed: int, index: int) -> Sample:
    """`niah_multiquery` with each of its 4 keys asked as a separate question (same context as
    `niah_multiquery` for the same seed). Each question is RULER's singular question followed by
    its singular answer prefix (the prefix names the key, so it cannot be shared): `answer_prefix`
    is empty and `meta["multi_question"]` is True."""
    s = niah_sample("niah_multiquery", tokenizer, length, seed, index)
    questions = []
    for key in s.meta["keys"]:
        _, q, p = niah_parts("numbers", key, singular=True)
        questions.append(q + p)
    meta = {**s.meta, "multi_question": True}
    return Sample(
        "niah_multiquery_split",
        s.id.replace("niah_multiquery", "niah_multiquery_split"),
        s.context,
        questions,
        "",
        [[a] for a in s.answers[0]],
        s.max_new_tokens,
        s.metric,
        meta,
    )


def _vt_context(count: TokenCounter, target: int, rng, fill_rng, num_hops: int, var_len: int, what: str):
    """RULER `variable_tracking.py`: one chain `VAR A = 12345`, `VAR B = VAR A `, ... in noise lines."""
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=var_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    template = VT_TEMPLATE.replace("{query}", value)
    header, question = template.split("{context}\n")
    prefix = VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value)

    def make(t: int) -> str:
        r = fill_rng()
        budget = t - count(header) - sum(count.pieces([x + "\n" for x in chain])) - 1
        lines = [x + "\n" for x in noise_filler(count, budget, NOISE, "\n\n")]
        if len(lines) <= len(chain):  # RULER's fallback: one noise sentence per line
            sents = [x + "." for x in NOISE[:-1].split(". ")]
            per = count.pieces([x + "\n" for x in sents])
            lines, total = [], 0
            while total + per[len(lines) % 5] / 2 <= budget:
                total += per[len(lines) % 5]
                lines.append(sents[len(lines) % 5])
        if len(lines) < len(chain):
            raise KVForgeError(f"{what}: length {target} is too short for a {num_hops}-hop chain")
        positions = sorted(r.sample(range(len(lines)), len(chain)))
        for j, pos in enumerate(positions):
            lines.insert(pos + j, chain[j])
        return header + "\n".join(lines).replace(". \n", ".\n") + "\n"

    context, n = fit_length(make, count, target, what)
    return context, question, prefix, names, n


def vt_sample(tokenizer, length: int, seed: int, index: int, num_hops: int = 4) -> Sample:
    """RULER `vt` (1 chain, 4 hops) with its one-shot example (3-letter variables) in front."""
    count = counter_for(tokenizer)
    rng = sample_rng("vt", seed, index)
    icl_len = min(470, max(200, length // 4))
    ctx, q, p, names, _ = _vt_context(
        count, icl_len, rng, lambda: sample_rng("vt", seed, index, "icl"), num_hops, 3, "vt example"
    )
    icl = ctx + q + p + " " + " ".join(names) + "\n\n\n\n"
    rest = length - count(icl)
    context, question, prefix, names, _ = _vt_context(
        count, rest, rng, lambda: sample_rng("vt", seed, index, "fill"), num_hops, 5, "vt"
    )
    context = icl + context
    meta = {"length": length, "n_tokens": count(context), "seed": seed, "index": index}
    return Sample(
        "vt",
        f"vt-{length}-{seed}-{index}",
        context,
        [question],
        prefix,
        [names],
        MAX_NEW_TOKENS["vt"],
        "string_match_all",
        meta,
    )


def _word_pool() -> list[str]:
    """RULER cwe: sorted(set(nouns + adjectives + verbs)) of wonderwords."""
    return sorted(set(wonder_words("noun") + wonder_words("adjective") + wonder_words("verb")))


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _solve_int(est, target: int, lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with est(n) <= target (est increasing), or lo."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if est(mid) <= target else (lo, mid - 1)
    return lo


def cwe_sample(tokenizer, length: int, seed: int, index: int, num_cw: int = 10) -> Sample:
    """RULER `cwe` (`common_words_extraction.py`): a numbered list where `num_cw` words repeat
    `freq_cw` times and the others `freq_ucw` times ((30, 3) from 4096 tokens on, (6, 1) below), after
    one solved example ((10, 3) with 40 words, or (3, 1) with 20). Below 1024 tokens (not in RULER):
    (3, 1) after a (2, 1) example of 12 words."""
    count, rng = counter_for(tokenizer), sample_rng("cwe", seed, index)
    pool = _word_pool()
    if length < 1024:  # below RULER's range: smaller counts so that the example and the list fit
        (fc, fu), (ex_n, ex_fc, ex_fu) = (3, 1), (12, 2, 1)
    elif length < 4096:
        (fc, fu), (ex_n, ex_fc, ex_fu) = (6, 1), (20, 3, 1)
    else:
        (fc, fu), (ex_n, ex_fc, ex_fu) = (30, 3), (40, 10, 3)
    header, question = CWE_TEMPLATE.split("{context}\n")
    ex_words = rng.sample(pool, ex_n)
    ex_list = ex_words[:num_cw] * ex_fc + ex_words[num_cw:] * ex_fu
    rng.shuffle(ex_list)
    example = header + _numbered(ex_list) + "\n" + question + CWE_ANSWER_PREFIX + " " + _numbered(ex_words[:num_cw])
    perm = list(pool)
    rng.shuffle(perm)
    word_counts = count.pieces([" " + w for w in perm])
    fixed = count(example + "\n" + header) + 1

    def est(n: int) -> int:
        entries = num_cw * fc + (n - num_cw) * fu
        nums = sum(count.pieces([f" {i}." for i in range(1, entries + 1)]))
        return fixed + nums + fc * sum(word_counts[:num_cw]) + fu * sum(word_counts[num_cw:n])

    def make(target: int) -> str:
        n = _solve_int(est, target, num_cw + 1, len(perm))
        words = perm[:num_cw] * fc + perm[num_cw:n] * fu
        sample_rng("cwe", seed, index, "shuffle").shuffle(words)
        return example + "\n" + header + _numbered(words) + "\n"

    context, n_tokens = fit_length(make, count, length, "cwe")
    meta = {"length": length, "n_tokens": n_tokens, "seed": seed, "index": index}
    return Sample(
        "cwe",
        f"cwe-{length}-{seed}-{index}",
        context,
        [question],
        CWE_ANSWER_PREFIX,
        [perm[:num_cw]],
        MAX_NEW_TOKENS["cwe"],
        "string_match_all",
        meta,
    )


def _zeta(alpha: float) -> float:
    n = 1000
    return sum(k**-alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha


def fwe_sample(tokenizer, length: int, seed: int, index: int, alpha: float = 2.0, word_len: int = 6) -> Sample:
    """RULER `fwe` (`freq_words_extraction.py`): random 6-letter coded words with Zipf counts
    `int(n * k**-alpha / zeta(alpha))`, rank 1 replaced by '...' (noise); answer = ranks 2-4.
    Vocabulary size length // 50 as RULER (at least 10). To hit `length`, a few extra '...' may be
    added (the noise word only, which the question says to ignore)."""
    count, rng = counter_for(tokenizer), sample_rng("fwe", seed, index)
    size = max(10, length // 50)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."
    header, question = FWE_TEMPLATE.split("{context}\n")
    z = _zeta(alpha)
    word_counts = count.pieces([" " + w for w in vocab])
    fixed = count(header) + 1

    def counts(n: int) -> list[int]:
        return [int(n * k**-alpha / z) for k in range(1, size + 1)]

    def est(n: int) -> int:
        return fixed + sum(c * w for c, w in zip(counts(n), word_counts))

    def make(target: int) -> str:
        n = _solve_int(est, target, 1, 40 * length + 100)
        # the Zipf counts move in steps of up to ~20 tokens: fill the rest with extra noise '...'
        pad = max(0, target - est(n)) // word_counts[0]
        words = [w for w, c in zip(vocab, counts(n)) for _ in range(c)] + ["..."] * pad
        sample_rng("fwe", seed, index, "shuffle").shuffle(words)
        return header + " ".join(words) + "\n"

    context, n_tokens = fit_length(make, count, length, "fwe")
    meta = {"length": length, "n_tokens": n_tokens, "seed": seed, "index": index, "vocab_size": size}
    return Sample(
        "fwe",
        f"fwe-{length}-{seed}-{index}",
        context,
        [question],
        FWE_ANSWER_PREFIX,
        [vocab[1:4]],
        MAX_NEW_TOKENS["fwe"],
        "string_match_all",
        meta,
    )


def ruler_generator(task: str):
    """`(tokenizer, length, n, seed) -> list[Sample]` for a RULER task name."""
    one = {
        "niah_multiquery_split": niah_multiquery_split,
        "vt": vt_sample,
        "cwe": cwe_sample,
        "fwe": fwe_sample,
    }.get(task) or (lambda tok, length, seed, i: niah_sample(task, tok, length, seed, i))

    def generate(tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
        return [one(tokenizer, length, seed, i) for i in range(n)]

    generate.__doc__ = f"RULER `{task}` samples (see `kvforge.eval.tasks.ruler`)."
    return generate


RULER_TASKS = (*NIAH_TASKS, "niah_multiquery_split", "vt", "cwe", "fwe")
