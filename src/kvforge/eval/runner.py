"""`kvforge eval`: every (press, ratio) on every sample, from one prefill per sample.

For each sample the context is prefilled once (recording each layer's queries); the uncompressed
baseline answers from that cache, and every (press, ratio) compresses a fork of it — identical to running
each press end to end (tested), at a fraction of the cost. Results are appended to `results.jsonl` as
they finish; re-running the same command skips finished work, so an interrupted run loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvforge.cache.kvcache import check_chunking
from kvforge.errors import KVForgeError, check_count
from kvforge.eval.report import write_report
from kvforge.eval.results import (  # noqa: F401
    BASELINE,
    SUMMARY_COLUMNS,
    format_table,
    load_done,
    read_results,
    summarize,
    write_summary_csv,
)
from kvforge.eval.runs import (
    check_out,
    device_name,
    drop_partial_line,
    git_commit,
    prepare_out,
    refuse_other_settings,
    versions,
)
from kvforge.generate import (
    DEFAULT_PROMPT_FORMAT,
    answer,
    answer_query_aware,
    check_prompt_format,
    compress_prefilled,
    encode,
    model_max_length,
    prefill_context,
    use_template,
)
from kvforge.presses.registry import parse_press  # noqa: F401  (re-exported)


def _score_answers(sample, predictions: list[str], baseline: list[str] | None) -> tuple[list[float], float | None]:
    from kvforge.eval.metrics import agreement, score

    scores = [score(sample.metric, p, g) for p, g in zip(predictions, sample.answers)]
    agree = None
    if baseline is not None:
        agree = sum(agreement(p, b) for p, b in zip(predictions, baseline)) / max(len(predictions), 1)
    return scores, agree


def _perplexity(model, cache, enc, continuation: list[int]) -> float:
    """Perplexity of `continuation` given the (possibly compressed) context in `cache`."""
    state = cache.snapshot()
    device = enc.ctx_ids.device
    ids = torch.tensor([continuation], device=device)
    mask = torch.cat([enc.ctx_mask, torch.ones_like(ids)], dim=1)
    pos = (mask.cumsum(-1) - 1)[:, -ids.shape[1] :]
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
    cache.restore(state)
    # the first continuation token is predicted by the context's last logits: skip it (same for every press)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean")
    return float(torch.exp(nll))


# the files a run writes into its folder (`--overwrite` deletes these, and the report's PNGs, nothing else)
RUN_FILES = ("results.jsonl", "summary.csv", "run_meta.json", "report.html", "needle_heatmap.png")


def prompt_description(tokenizer, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> str:
    """How prompts are built, as a run setting: the format's name (`kvforge.prompt`), then the chat template (by
    its hash) or plain text."""
    if not use_template(tokenizer, None):
        return f"{prompt_format}: plain text: context + question, answer prefix appended"
    digest = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:12]
    return f"{prompt_format}: chat template {digest} around context + question; answer prefix appended"


def _recorded_settings(out_dir: Path) -> dict | None:
    """The settings of the run whose rows are in `out_dir` (None when it holds no rows): `run_meta.json`'s
    `settings` (older runs: the matching keys of its `args`)."""
    results = out_dir / "results.jsonl"
    if not results.exists() or results.stat().st_size == 0:
        return None
    try:
        meta = json.loads((out_dir / "run_meta.json").read_text())
    except (OSError, ValueError):
        raise KVForgeError(f"{str(out_dir)!r} holds results.jsonl but no readable run_meta.json, so its settings "
                           "are unknown; choose another --out or pass --overwrite to start clean") from None
    if "settings" in meta:
        return meta["settings"]
    args = meta.get("args", {})
    return {k: args[k] for k in ("model", "seed", "max_new_tokens", "query_aware", "cuda_graph") if k in args}


def _clear_run(out_dir: Path) -> None:
    """Delete what an earlier run wrote into `out_dir` (its files only, never the folder's other contents)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for png in out_dir.glob("score_*.png"):
        png.unlink()


def _check_args(tasks, presses, ratios, lengths, per_task, max_new_tokens, press_batch, seed, query_aware) -> dict:
    """Every argument of a sweep, before the model loads or anything is written; returns the press factories.
    Each (press, ratio) is built once here, so a spec that fails at some ratio fails now, not after a baseline."""
    from kvforge.eval.tasks import TASKS

    if not presses:
        raise KVForgeError("the press list is empty; give at least one press (see `kvforge presses`)")
    if not tasks:
        raise KVForgeError("the task list is empty; give at least one task")
    for t in tasks:
        if t not in TASKS:
            raise KVForgeError(f"unknown task {t!r}; allowed: {', '.join(TASKS)}")
    if not ratios:
        raise KVForgeError("the ratio list is empty; give at least one compression ratio in [0, 1)")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise KVForgeError(f"ratio {r} is outside the allowed range [0, 1)")
    if not lengths:
        raise KVForgeError("the length list is empty; give at least one context length")
    for n in lengths:
        check_count(n, "length")
    for t in tasks:
        check_count(per_task.get(t), f"samples of {t}" if len(per_task) > 1 else "samples")
    if max_new_tokens is not None:
        check_count(max_new_tokens, "max_new_tokens")
    check_count(press_batch, "press_batch")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KVForgeError(f"seed={seed!r}; allowed: an integer")
    factories = {spec: parse_press(spec) for spec in presses}
    for spec, factory in factories.items():
        for r in [0.0] if factory.ratio_free else ratios:
            press = factory(r)
            if query_aware and press.has_extra_pass:
                raise KVForgeError(f"{spec}: {press.name} scores the context with extra passes (query-agnostic by "
                                   "design); query_aware is not supported for it")
    return factories


def run_eval(
    model_name: str,
    tasks: list[str],
    presses: list[str],
    ratios: list[float],
    length: int | list[int],
    samples: int | dict[str, int],
    out: str | os.PathLike,
    seed: int = 0,
    max_new_tokens: int | None = None,
    shared_prefill: bool = True,
    model=None,
    tokenizer=None,
    progress: bool = True,
    argv: list[str] | None = None,
    query_aware: bool = False,
    press_batch: int = 1,
    cuda_graph: bool = False,
    overwrite: bool = False,
    chunk_size: int | None = None,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
    device: str | None = None,
    dtype: str | None = None,
    sample_batch: int = 1,
) -> Path:
    """Run the sweep; returns the output directory (results.jsonl, summary.csv, run_meta.json, report).

    `press_batch > 1`: the (press, ratio) forks of a sample are answered that many at a time as one batch
    (same answers, several times faster on CPU; decode-time presses still run one at a time).
    `query_aware=True`: every (press, ratio) compresses context + question together, one prefill per question
    (`generate.answer_query_aware`); the uncompressed baseline and perplexity tasks are unchanged.
    `cuda_graph=True`: answers are decoded by replaying one captured step per token (`generate.answer`; several
    times faster on a GPU, where a small model's eager decoding is launch-bound).

    `prompt_format`: "kvpress" (default: token for token kvpress's pipeline) or "kvforge" (`kvforge.prompt`);
    recorded in `run_meta.json` (`prompt_format`, with the chat template's hash) and in every row's settings.

    Runs are keyed by their settings (model, dtype, prompt format, seed, max_new_tokens, query_aware, cuda_graph;
    written to `run_meta.json` and into every row with the row's length): resuming in an `out` whose rows were
    made with other settings is refused with a one-line KVForgeError naming the setting, unless `overwrite=True`,
    which deletes that run's files first. Every argument is checked before the model loads; a refused run writes
    nothing.

    `device`, `dtype`: where and in what precision `model_name` is loaded when no `model` is given (`load_model`'s
    defaults: the CPU, float32 there and bfloat16 on CUDA; "auto" picks CUDA when there is one).

    `chunk_size`: prefill every context that many tokens at a time, the press compressing each chunk as it comes
    (`generate.prefill`); every (press, ratio) then prefills on its own (a shared prefill replays one unchunked
    prefill's queries), and the chunk size is a setting of the run (`prefill_chunk`).
    """
    from kvforge.eval.tasks import make_samples

    lengths = [length] if isinstance(length, int) else list(length)
    per_task = samples if isinstance(samples, dict) else dict.fromkeys(tasks, samples)
    factories = _check_args(tasks, presses, ratios, lengths, per_task, max_new_tokens, press_batch, seed,
                            query_aware)
    check_count(sample_batch, "sample_batch")
    if chunk_size is not None:
        check_chunking(None, chunk_size)
        if query_aware:
            raise KVForgeError("query_aware prefills context + question with model.generate, unchunked; drop "
                               "--prefill-chunk or --query-aware")
        for factory in factories.values():
            check_chunking(factory(0.0 if factory.ratio_free else ratios[0]), chunk_size)
        shared_prefill = False
    check_prompt_format(prompt_format)
    if model is None:  # a bad device or dtype is refused before anything is written
        from kvforge.models import resolve_device, resolve_dtype

        resolve_dtype(dtype, resolve_device(device))
    out_dir = check_out(out)
    settings = {"model": model_name, "seed": seed, "max_new_tokens": max_new_tokens, "query_aware": query_aware,
                "cuda_graph": cuda_graph}
    if chunk_size is not None:  # only when set: runs made before chunking existed resume unchanged
        settings["prefill_chunk"] = chunk_size
    recorded = None if overwrite else _recorded_settings(out_dir)
    if recorded is not None:
        refuse_other_settings(out_dir, recorded, settings)  # before the model loads
    if model is None:
        from kvforge.models import load_model

        model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    limit = model_max_length(model)
    for n in lengths:
        if limit and n > limit:
            raise KVForgeError(f"length {n} is outside the model's window of 1..{limit} tokens")
    settings.update(dtype=str(model.dtype).removeprefix("torch."),
                    prompt_format=prompt_description(tokenizer, prompt_format))
    if recorded is not None:
        refuse_other_settings(out_dir, recorded, settings)
    all_samples, groups, row_facts = [], [], {}
    for t in tasks:
        for n in lengths:
            made = make_samples(t, tokenizer, n, per_task[t], seed)
            counts = {}
            for s in made:
                mnt = max_new_tokens or s.max_new_tokens
                # context + question + answer must fit the model's positions: refused now, not mid-run
                e = encode(model, tokenizer, [s.context], [[] if s.metric == "ppl" else s.questions], s.answer_prefix,
                           max_new_tokens=0 if s.metric == "ppl" else mnt, prompt_format=prompt_format)
                counts[s.id] = token_counts(e)[0]
                all_samples.append(s)
                row_facts[(s.task, s.id)] = {"length": n, "max_new_tokens": None if s.metric == "ppl" else mnt}
            groups += sample_groups(by_token_counts(made, counts) if sample_batch > 1 else made, sample_batch)

    out_dir = prepare_out(out_dir)  # every check passed: the first write
    if overwrite:
        _clear_run(out_dir)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta_path = out_dir / "run_meta.json"
    meta = {
        "args": {"model": model_name, "tasks": tasks, "presses": presses, "ratios": ratios, "length": length,
                 "samples": samples, "seed": seed, "max_new_tokens": max_new_tokens, "shared_prefill": shared_prefill,
                 "query_aware": query_aware, "press_batch": press_batch, "sample_batch": sample_batch,
                 "cuda_graph": cuda_graph,
                 "prompt_format": prompt_format},
        "settings": settings,
        "argv": argv, "git_commit": git_commit(), "versions": versions(), "device": device_name(model),
        "started": started, "prompt_format": settings["prompt_format"],
    }
    meta_path.write_text(json.dumps(meta, indent=2))

    results_path = out_dir / "results.jsonl"
    drop_partial_line(results_path)
    done = load_done(results_path)
    grid = [(spec, 0.0 if factories[spec].ratio_free else r) for spec in presses for r in ratios]
    grid = list(dict.fromkeys(grid))  # a ratio-free spec runs once
    total = len(all_samples) * (1 + len(grid))
    bar = tqdm(total=total, desc="eval", unit="run", disable=not progress, dynamic_ncols=True)
    wall0 = time.perf_counter()
    with results_path.open("a", encoding="utf-8") as sink:

        def emit(record: dict) -> None:
            record = {**record, **row_facts[(record["task"], record["sample_id"])], "settings": settings}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[(record["task"], record["sample_id"], record["press"], record["compression_ratio"])] = record

        for group in groups:
            todo = [(s, r) for s, r in grid if any((x.task, x.id, s, r) not in done for x in group)]
            base_done = sum((x.task, x.id, BASELINE, 0.0) in done for x in group)
            bar.update(sum((x.task, x.id, s, r) in done for x in group for s, r in grid) + base_done)
            if not todo and base_done == len(group):
                continue
            more = f" +{len(group) - 1}" if len(group) > 1 else ""
            bar.set_postfix_str(f"{group[0].task} {group[0].id[-12:]}{more}")
            _run_group(model, tokenizer, group, factories, todo, done, emit, max_new_tokens, shared_prefill, bar,
                       query_aware, press_batch, cuda_graph, chunk_size, prompt_format)
    bar.close()
    meta["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["wall_seconds"] = round(time.perf_counter() - wall0, 2)
    meta_path.write_text(json.dumps(meta, indent=2))
    write_summary(out_dir)
    return out_dir


def _run_batched(model, tok, group, factories, todo, full, enc, mnt, report, bar, batch,
                 cuda_graph: bool = False) -> list:
    """Answer the (press, ratio) forks of one prefill `batch` at a time, as the rows of one stacked cache
    (`KVCache.stack`; each fork holds every sample of `group`). Presses that act while decoding can't share a
    batch: they are returned for the one-at-a-time path. Recorded seconds are the group's time divided evenly."""
    from kvforge.cache.kvcache import KVCache
    from kvforge.generate import Encoded

    rest, ready = [], []
    for spec, ratio in todo:
        press = factories[spec](ratio)
        alone = press.acts_while_decoding or _codes(press)
        (rest if alone else ready).append((spec, ratio, press))
    n = len(group)
    for i in range(0, len(ready), batch):
        forks_of = ready[i : i + batch]
        t0 = time.perf_counter()
        forks = [compress_prefilled(full, press, model, enc) for _, _, press in forks_of]
        stats = [f.stats() for f in forks]
        k = len(forks)
        stacked = KVCache.stack(forks)
        del forks
        enc_k = Encoded(enc.ctx_ids.repeat(k, 1), enc.ctx_mask.repeat(k, 1), enc.q_rows * k, enc.pad_id)
        answers = answer(model, tok, stacked, enc_k, mnt, cuda_graph=cuda_graph)
        del stacked
        each = (time.perf_counter() - t0) / k
        for f, ((spec, ratio, _), st) in enumerate(zip(forks_of, stats)):
            report(spec, ratio, answers[f * n : (f + 1) * n], [float("nan")] * n, each, 0.0, st)
    return [(spec, ratio) for spec, ratio, _ in rest]


def _codes(press) -> bool:
    """True for quantizing presses: their forks are answered one at a time, since a stacked cache holds the
    decoded entries and would not quantize the tokens generated afterwards. (Channel-pruned and merged layers
    never code later tokens, so their stacked answers are the same.)"""
    inner = getattr(press, "presses", None)
    return press.kind == "quantization" or bool(inner and any(_codes(p) for p in inner))


def by_token_counts(samples: list, counts: dict) -> list:
    """`samples` reordered (stably) so that batchable samples of equal token counts `counts[id]` (context, each
    question) sit together: batches then hold less padding, and quantizers (which answer samples of equal counts
    together, `equal_length_groups`) fewer sub-groups. Records are keyed by sample, so the order changes no row."""
    return sorted(samples, key=lambda s: (s.metric, len(s.questions), s.max_new_tokens, counts[s.id]))


def sample_groups(samples: list, size: int) -> list[list]:
    """Consecutive samples (of one task and length) answered as one batch of at most `size`: same question count
    and answer length; perplexity samples alone."""
    groups: list[list] = []

    def key(s):
        return (s.task, len(s.questions), s.max_new_tokens, s.metric)

    for s in samples:
        g = groups[-1] if groups else None
        if (g and len(g) < size and s.metric != "ppl" and g[0].metric != "ppl" and key(g[0]) == key(s)):
            g.append(s)
        else:
            groups.append([s])
    return groups


def _run_group(model, tok, group, factories, todo, done, emit, max_new_tokens, shared, bar,
               query_aware=False, batch=1, cuda_graph=False, chunk_size=None, prompt_format=DEFAULT_PROMPT_FORMAT):
    """Every (press, ratio) of `todo` on the samples of `group`, prefilled as one left-padded batch (each row
    answers as it would alone: batch equality is tested per press; quantizers, whose token groups left padding
    would shift, run on the samples of equal token counts together, `equal_length_groups`, else alone). Rows
    already in `done` are not written again; a group's seconds and KV bytes are shared evenly by its samples."""
    first, n = group[0], len(group)
    is_ppl = first.metric == "ppl"  # a perplexity sample is always a group of its own
    mnt = max_new_tokens or first.max_new_tokens
    continuation: list[int] = []
    contexts = [s.context for s in group]
    if is_ppl:  # compress the first 3/4 of the text, measure perplexity on the rest
        ids = tok(first.context, add_special_tokens=False)["input_ids"]
        cut = len(ids) * 3 // 4
        contexts, continuation = [tok.decode(ids[:cut])], ids[cut:]
    questions = [[] if is_ppl else s.questions for s in group]
    enc = encode(model, tok, contexts, questions, [s.answer_prefix for s in group],
                 max_new_tokens=0 if is_ppl else mnt, prompt_format=prompt_format)

    def evaluate(cache) -> tuple[list[list[str]], list[float]]:
        if is_ppl:
            return [[]], [_perplexity(model, cache, enc, continuation)]
        return answer(model, tok, cache, enc, mnt, cuda_graph=cuda_graph), [float("nan")] * n

    baselines: list = [None] * n

    def report(spec, ratio, answers, ppls, seconds, pre, stats) -> None:
        for i, s in enumerate(group):
            if (s.task, s.id, spec, ratio) in done:
                continue
            emit(_record(s, spec, ratio, answers[i], baselines[i], ppls[i], seconds / n, pre / n, stats, n))
            bar.update(1)

    t0 = time.perf_counter()
    full = prefill_context(model, enc, None, mnt, record=shared, chunk_size=chunk_size)
    prefill_s = time.perf_counter() - t0
    base_keys = [(s.task, s.id, BASELINE, 0.0) for s in group]
    if all(k in done for k in base_keys):
        baselines = [done[k]["predictions"] for k in base_keys]
    else:
        t0 = time.perf_counter()
        full_stats = full.stats()
        answers, ppls = evaluate(full)
        report(BASELINE, 0.0, answers, ppls, time.perf_counter() - t0, prefill_s, full_stats)
        baselines = answers
    alone = []
    if n > 1 and _padded(enc):  # quantizers code token groups counted from a row's first entry, left padding
        # included: they answer in sub-groups of samples whose token counts are equal (no padding), else alone
        alone = [(spec, ratio) for spec, ratio in todo if _codes(factories[spec](ratio))]
        todo = [x for x in todo if x not in alone]
    if shared and batch > 1 and not query_aware and not is_ppl:
        todo = _run_batched(model, tok, group, factories, todo, full, enc, mnt, report, bar, batch, cuda_graph)
    for spec, ratio in todo:
        t0 = time.perf_counter()
        press = factories[spec](ratio)
        if query_aware and not is_ppl:  # context + question compressed together, once per question
            answers, cache = answer_query_aware(model, tok, enc, press, mnt)
            ppls, pre = [float("nan")] * n, 0.0
        else:
            if shared:
                cache = compress_prefilled(full, press, model, enc)
                pre = 0.0
            else:  # end to end: a fresh prefill with the press active
                cache = prefill_context(model, enc, press, mnt, chunk_size=chunk_size)
                pre = time.perf_counter() - t0
            answers, ppls = evaluate(cache)
        report(spec, ratio, answers, ppls, time.perf_counter() - t0, pre, cache.stats())
        del cache
    if alone:
        del full
        for sub in equal_length_groups(group, enc):
            _run_group(model, tok, sub, factories, alone, done, emit, max_new_tokens, shared, bar, query_aware,
                       1, cuda_graph, chunk_size, prompt_format)


def token_counts(enc) -> list[tuple]:
    """Per row of `enc`: (context tokens, (tokens of each question)). Rows of equal counts need no padding."""
    return [(n, tuple(len(q) for q in qs)) for n, qs in zip(enc.ctx_mask.sum(1).tolist(), enc.q_rows)]


def _padded(enc) -> bool:
    """True when a batch's rows hold padding: contexts or some question of different token counts."""
    return len(set(token_counts(enc))) > 1


def equal_length_groups(group: list, enc) -> list[list]:
    """The samples of `group` (encoded as `enc`) in sub-groups whose contexts and questions have the same token
    counts, so that none of them is padded; in order of first appearance."""
    subs: dict[tuple, list] = {}
    for key, sample in zip(token_counts(enc), group):
        subs.setdefault(key, []).append(sample)
    return list(subs.values())


def _record(sample, press, ratio, preds, baseline, ppl, seconds, prefill_s, stats, rows: int = 1) -> dict:
    if sample.metric == "ppl":
        scores, agree, score = [], None, ppl
    else:
        scores, agree = _score_answers(sample, preds, None if press == BASELINE else baseline)
        score = sum(scores) / max(len(scores), 1)
    return {
        "task": sample.task, "sample_id": sample.id, "press": press, "compression_ratio": ratio,
        "metric": sample.metric, "questions": sample.questions, "predictions": preds, "golds": sample.answers,
        "scores": scores, "score": score, "agreement": agree, "seconds": round(seconds, 4),
        "prefill_seconds": round(prefill_s, 4), "meta": sample.meta,
        "kv_bytes": None if stats is None else stats["bytes"] // rows, "sample_batch": rows,
    }


def write_summary(out_dir: str | os.PathLike) -> list[dict]:
    """Write `summary.csv` and the HTML report from `results.jsonl`; returns the summary rows."""
    rows = write_summary_csv(out_dir)
    write_report(out_dir)
    return rows
