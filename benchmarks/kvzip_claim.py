"""KVzip's claim at small scale: one query-agnostic cache serves many questions, query-aware ones do not.

Claim (Kim et al. 2025, https://arxiv.org/abs/2505.23416): KVzip keeps near-baseline accuracy with 30% of
the KV cache kept, while query-aware eviction (SnapKV with the question in its window) degrades when one
compressed cache serves several questions. Tested here on SmolLM2-135M, generated multi-question tasks
(`facts_qa`, `niah_multiquery_split`: 4 questions per context, all answered from one compressed cache).

Rows (kvforge `compression_ratio` = 1 − kept fraction):
- `none`: uncompressed baseline;
- `kvzip`: query-agnostic, context reconstruction (pair level, evict);
- `snapkv`: query-agnostic (window = the end of the context, kvpress's setting);
- `snapkv-q1-shared`: query-aware on the *first* question (its last 32 tokens are the observation window),
  and that one compressed cache answers all 4 questions — the paper's multi-query setting for query-aware
  methods (the question's own KV is not kept);
- `snapkv-query-aware` (when `run_eval(query_aware=...)` exists): context + question compressed together,
  a fresh prefill and cache *per question* — query-aware at its best, 4× the prefills.
Per-question columns: `Q1` (the question snapkv-q1-shared was compressed for) vs `Q2-4` (the others).

Resumable (results are appended as they finish; re-run the same command). Writes `<out>/*/results.jsonl`,
`<out>/overhead.json` and the markdown table (default `runs/kvzip_claim.md`; the results: benchmarks/README.md).

    python benchmarks/kvzip_claim.py --quick            # 2 samples/task, kept 0.3/0.5/0.7/0.9
    python benchmarks/kvzip_claim.py                    # 5 samples/task, kept 0.1..0.9 (long on CPU)
    python benchmarks/kvzip_claim.py --device cuda --model /path/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvforge.eval.metrics import agreement
from kvforge.eval.metrics import score as metric_score
from kvforge.eval.runner import BASELINE, run_eval
from kvforge.eval.tasks import make_samples
from kvforge.generate import answer, compress_prefilled, encode, prefill_context
from kvforge.models import load_model
from kvforge.presses.base import aggregate_groups
from kvforge.presses.kvzip import kvzip_scores
from kvforge.presses.snapkv import SnapKVPress

TASKS = ["facts_qa", "niah_multiquery_split"]
Q1 = "snapkv-q1-shared"
QA = "snapkv-query-aware"


# ------------------------------------------------------------------------------------------------------
# Query-aware SnapKV on the first question, one cache for every question
# ------------------------------------------------------------------------------------------------------
@dataclass
class QuestionWindowSnapKV(SnapKVPress):
    """SnapKV whose observation window is the last `window_size` tokens of a question (queries captured by
    `question_queries`), scoring only the context entries; avg-pooled as SnapKV. Not registered."""

    question_queries: dict | None = None

    def score(self, ctx):
        q = self.question_queries[ctx.layer_idx]  # [B, Hq, m, D], positions right after the context
        b, hq, m, d = q.shape
        keys = ctx.keys.float()
        h, n = keys.shape[1], keys.shape[2]
        w = min(self.window_size, m)
        qw = q[:, :, m - w :].float().reshape(b, h, hq // h, w, d)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", qw, keys) * ctx.scaling
        logits = logits.masked_fill(~ctx.real[:, :, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(3)  # [B, H, G, n]
        s = aggregate_groups(probs, self.gqa_aggregation).reshape(b * h, 1, n)
        s = F.avg_pool1d(s, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return s.reshape(b, h, n)


@torch.inference_mode()
def question_queries(model, full, enc, q_ids: list[int]) -> dict:
    """Queries of every compressible layer for `q_ids` appended to the prefilled context (cache restored)."""
    fork = full.fork()
    state = fork.snapshot()
    got = {}
    fork.observer = lambda ctx: got.__setitem__(ctx.layer_idx, ctx.query.clone())
    ids = torch.tensor([q_ids], device=enc.ctx_ids.device)
    mask = torch.cat([enc.ctx_mask, torch.ones_like(ids)], dim=1)
    pos = (mask.cumsum(-1) - 1)[:, -ids.shape[1] :]
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=fork, logits_to_keep=1)
    finally:
        fork.observer = None
        fork.restore(state)
    return got


def _done(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[(r["task"], r["sample_id"], r["press"], r["compression_ratio"])] = r
    return out


def run_q1_shared(model, tok, tasks, ratios, length, samples, seed, out: Path, max_new_tokens) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = _done(path)
    with path.open("a", encoding="utf-8") as sink:
        for task in tasks:
            for s in make_samples(task, tok, length, samples, seed):
                todo = [r for r in ratios if (task, s.id, Q1, r) not in done]
                if not todo:
                    continue
                mnt = max_new_tokens or s.max_new_tokens
                enc = encode(model, tok, [s.context], [s.questions], s.answer_prefix, max_new_tokens=mnt)
                full = prefill_context(model, enc, None, mnt, record=True)
                queries = question_queries(model, full, enc, enc.q_rows[0][0])
                for r in todo:
                    t0 = time.perf_counter()
                    cache = compress_prefilled(full, QuestionWindowSnapKV(compression_ratio=r,
                                                                          question_queries=queries), model, enc)
                    preds = answer(model, tok, cache, enc, mnt)[0]
                    scores = [metric_score(s.metric, p, g) for p, g in zip(preds, s.answers)]
                    rec = {"task": task, "sample_id": s.id, "press": Q1, "compression_ratio": r,
                           "metric": s.metric, "questions": s.questions, "predictions": preds, "golds": s.answers,
                           "scores": scores, "score": sum(scores) / len(scores),
                           "seconds": round(time.perf_counter() - t0, 3), "kv_bytes": cache.stats()["bytes"]}
                    sink.write(json.dumps(rec) + "\n")
                    sink.flush()
                    print(f"{Q1} {task} {s.id} r={r}: {rec['score']:.2f}", flush=True)


# ------------------------------------------------------------------------------------------------------
# Scoring overhead
# ------------------------------------------------------------------------------------------------------
def _sync(model):
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def measure_overhead(model, tok, length: int, contexts: int = 2, reps: int = 3, seed: int = 0) -> dict:
    """Median prefill time vs median KVzip scoring time (repeat pass + scores) at `length` tokens."""
    pre, sc = [], []
    for s in make_samples("facts_qa", tok, length, contexts, seed):
        enc = encode(model, tok, [s.context], [s.questions[:1]], s.answer_prefix, max_new_tokens=1)
        cache = prefill_context(model, enc, None, 1)  # warm-up
        kvzip_scores(model, cache, enc)
        for _ in range(reps):
            _sync(model)
            t0 = time.perf_counter()
            cache = prefill_context(model, enc, None, 1)
            _sync(model)
            t1 = time.perf_counter()
            kvzip_scores(model, cache, enc)
            _sync(model)
            t2 = time.perf_counter()
            pre.append(t1 - t0)
            sc.append(t2 - t1)
            del cache
    p, s_ = statistics.median(pre), statistics.median(sc)
    return {"tokens": int(enc.ctx_ids.shape[1]), "prefill_s": round(p, 4), "scoring_s": round(s_, 4),
            "ratio": round(s_ / p, 2), "runs": len(pre), "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------
def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _fmt(x):
    return "–" if x is None else f"{x:.2f}"


def write_markdown(out: Path, md: Path, kept: list[float], argv: str, qa_missing: str | None,
                   title: str | None = None, append: bool = False, drop: tuple = ()) -> str:
    recs = []
    for sub in ("agnostic", "q1_shared", "query_aware"):
        for r in _done(out / sub / "results.jsonl").values():
            if sub == "query_aware" and r["press"] != BASELINE:
                r = {**r, "press": QA}
            if sub != "agnostic" and r["press"] == BASELINE:
                continue
            if r["press"] in drop:
                continue
            recs.append(r)
    base = {(r["task"], r["sample_id"]): r["predictions"] for r in recs if r["press"] == BASELINE}
    by = defaultdict(list)
    for r in recs:
        by[(r["press"], round(1 - r["compression_ratio"], 4) if r["press"] != BASELINE else 1.0)].append(r)
    tasks = sorted({r["task"] for r in recs})
    presses = [p for p in (BASELINE, "kvzip", "snapkv", Q1, QA) if any(k[0] == p for k in by)]
    title = title or "KVzip claim check (SmolLM2-135M, one compressed cache, 4 questions per context)"
    lines = [("## " if append else "# ") + title, "", f"Ran: `{argv}`", ""]
    n_samples = {t: len({r["sample_id"] for r in recs if r["task"] == t}) for t in tasks}
    lines.append("Samples: " + ", ".join(f"{t} {n}" for t, n in n_samples.items()) + " (4 questions each); accuracy "
                 "= mean per-question score (facts_qa: string_match_part, niah: string_match_all); `agree` = token F1 "
                 "of the answers against the uncompressed answers (1 = unchanged); Q1 = the first question (the one "
                 f"`{Q1}` was compressed for), Q2-4 = the others. `kept` = 1 − compression_ratio.")
    lines.append("")
    head = ["press", "kept"] + tasks + ["mean", "Q1", "Q2-4", "agree", "agree Q1", "agree Q2-4"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in presses:
        for k in ([1.0] if p == BASELINE else sorted(kept, reverse=True)):
            rs = by.get((p, round(k, 4)), [])
            if not rs:
                continue
            per_task = [_mean(r["score"] for r in rs if r["task"] == t) for t in tasks]
            q1 = _mean(r["scores"][0] for r in rs)
            rest = _mean(x for r in rs for x in r["scores"][1:])
            ag = [(j, agreement(a, b)) for r in rs if (r["task"], r["sample_id"]) in base
                  for j, (a, b) in enumerate(zip(r["predictions"], base[(r["task"], r["sample_id"])]))]
            agree = [_mean(x for _, x in ag), _mean(x for j, x in ag if j == 0), _mean(x for j, x in ag if j > 0)]
            row = [p, f"{k:.1f}"] + [_fmt(x) for x in per_task] + [_fmt(_mean(x for x in per_task if x is not None)),
                                                                    _fmt(q1), _fmt(rest)] + [_fmt(x) for x in agree]
            lines.append("| " + " | ".join(row) + " |")
    if qa_missing:
        lines += ["", f"`{QA}` row left out: {qa_missing}"]
    ov = out / "overhead.json"
    if ov.exists():
        o = json.loads(ov.read_text())
        lines += ["", f"Scoring overhead at {o['tokens']} tokens on {o['device']} ({o['dtype']}, {o['threads']} "
                  f"threads): prefill {o['prefill_s']:.3f} s, KVzip scoring (repeat pass + scores) "
                  f"{o['scoring_s']:.3f} s = **{o['ratio']:.2f}× prefill** (median of {o['runs']}; paper: ~2–3×)."]
    text = "\n".join(lines) + "\n"
    if append and md.exists():
        text = md.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text
    md.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/kvzip_claim")
    p.add_argument("--md", default="runs/kvzip_claim.md")
    p.add_argument("--quick", action="store_true", help="2 samples per task, kept 0.3/0.5/0.7/0.9")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--kept", default=None, help="kept fractions, comma-separated (default 0.1..0.9)")
    p.add_argument("--length", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap answers (default: each task's own)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: agnostic,q1,query_aware,overhead")
    p.add_argument("--overhead-reps", type=int, default=3)
    p.add_argument("--report-only", action="store_true", help="only (re)write the markdown from --out")
    p.add_argument("--title", default=None, help="heading of the markdown section")
    p.add_argument("--append", action="store_true", help="append a section to --md instead of replacing it")
    p.add_argument("--drop", default="", help="presses to leave out of the table (e.g. runs known bad)")
    args = p.parse_args(argv)
    samples = args.samples or (2 if args.quick else 5)
    kept = [float(x) for x in args.kept.split(",")] if args.kept else (
        [0.3, 0.5, 0.7, 0.9] if args.quick else [round(0.1 * i, 1) for i in range(1, 10)])
    ratios = [round(1 - k, 4) for k in kept]
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/kvzip_claim.py " + " ".join(sys.argv[1:] if argv is None else argv)
    drop = tuple(filter(None, args.drop.split(",")))
    log = out / "commands.txt"  # every invocation that ran something, so a report names how it was made
    if args.report_only:
        ran = log.read_text(encoding="utf-8").strip().replace("\n", "`; `") if log.exists() else cmd
        print(write_markdown(out, Path(args.md), kept, ran, None, args.title, args.append, drop))
        return
    with log.open("a", encoding="utf-8") as f:
        f.write(cmd + "\n")
    model, tok = load_model(args.model, device=args.device)
    common = dict(length=args.length, samples=samples, seed=args.seed, max_new_tokens=args.max_new_tokens,
                  model=model, tokenizer=tok)

    if "agnostic" not in skip:
        run_eval(args.model, TASKS, ["kvzip", "snapkv"], ratios, out=out / "agnostic", **common)
    if "q1" not in skip:
        run_q1_shared(model, tok, TASKS, ratios, args.length, samples, args.seed, out / "q1_shared",
                      args.max_new_tokens)
    qa_missing = None
    if "query_aware" not in inspect.signature(run_eval).parameters:
        qa_missing = "kvforge.eval.runner.run_eval has no query_aware option yet"
    elif "query_aware" not in skip:
        qdir = out / "query_aware"
        qdir.mkdir(parents=True, exist_ok=True)
        base = [r for r in _done(out / "agnostic" / "results.jsonl").values() if r["press"] == BASELINE]
        have = _done(qdir / "results.jsonl")
        with (qdir / "results.jsonl").open("a", encoding="utf-8") as f:  # reuse the baseline answers
            for r in base:
                if (r["task"], r["sample_id"], BASELINE, 0.0) not in have:
                    f.write(json.dumps(r) + "\n")
        run_eval(args.model, TASKS, ["snapkv"], ratios, out=qdir, query_aware=True, **common)
    if "overhead" not in skip and not (out / "overhead.json").exists():
        o = measure_overhead(model, tok, args.length, reps=args.overhead_reps, seed=args.seed)
        (out / "overhead.json").write_text(json.dumps(o, indent=1))
    print(write_markdown(out, Path(args.md), kept, cmd, qa_missing, args.title, args.append, drop))


if __name__ == "__main__":
    main()
