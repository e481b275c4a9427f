"""`kvforge link eval`: multi-document QA with the gold document at chosen positions, answered four ways:

- `full`: ordinary prefill of everything (every token sees every earlier one) — the upper reference;
- `naive`: documents reused (encoded alone, re-rotated), no links;
- `links`: reused documents + the trained link tokens (the model saved by `kvforge train kvlink`);
- `recompute`: reused documents, each one's first k tokens recomputed seeing everything before (CacheBlend-style).

Held-out samples: `data.qa_sample` from a seed stream training never uses; sample i is the same world for every gold
position (only the gold moves). `hops=2`: two-hop questions instead (a person and their employer, or a company and its
CEO: two gold documents, the first at the gold position, the second anywhere else): the answer combines two documents,
which after separate encoding only the prompt's tokens (and the links) can do. Score: best-subspan exact match (the
normalised gold appears in the normalised answer; KVLink's NQ metric). `ttft_ms`: time from the request to the first
token's logits with the documents already encoded (in memory) — reading them from a `DocumentStore` is timed
separately by `benchmarks/link_ttft.py`. Rows are appended to `results.jsonl` as they finish; re-running the same
command resumes. `summary.csv`: `mode,gold_position,n,score,ci_low,ci_high,ttft_ms` (mean score, its Wilson 95%
interval, median time, position counted from 0), `summary.png`.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvforge.errors import KVForgeError
from kvforge.eval.metrics import normalize_answer
from kvforge.eval.runs import device_name, drop_partial_line, git_commit, prepare_out, versions
from kvforge.link.data import LinkSample, as_prompt, qa_sample
from kvforge.link.reuse import generate, prefill, tokenize
from kvforge.link.store import MemoryStore
from kvforge.link.tokens import load_links
from kvforge.prompt import use_template

MODES = ("full", "naive", "links", "recompute")
SUMMARY_COLUMNS = ("mode", "gold_position", "n", "score", "ci_low", "ci_high", "ttft_ms")


@dataclass
class EvalConfig:
    docs: int = 10
    samples: int = 20
    modes: tuple[str, ...] = MODES
    positions: tuple[int, ...] = (0, 4, 9)
    recompute_k: int = 16
    max_new_tokens: int = 16
    seed: int = 0
    template: bool | None = None
    ttft: bool = True  # time each request's prefill apart (one more prefill per answer); False: answers only
    hops: int = 1  # 1: single-hop questions (one gold document); 2: two-hop (two gold documents)


def parse_positions(text: str, docs: int) -> tuple[int, ...]:
    """`first,middle,last` (0, docs // 2, docs − 1), `all`, or 0-based indices."""
    named = {"first": 0, "middle": docs // 2, "last": docs - 1}
    if text.strip() == "all":
        return tuple(range(docs))
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        value = named.get(part, part)
        try:
            value = int(value)
        except ValueError:
            raise KVForgeError(f"--positions {part!r}; allowed: first, middle, last, all or 0-based indices") from None
        if not 0 <= value < docs:
            raise KVForgeError(f"gold position {value} is outside 0..{docs - 1} (--docs {docs})")
        out.append(value)
    return tuple(dict.fromkeys(out))


def best_subspan_em(prediction: str, golds: list[str]) -> float:
    """1.0 when a normalised gold string occurs in the normalised prediction (KVLink's NQ metric)."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) in pred for g in golds))


def eval_sample(seed: int, index: int, docs: int, gold_position: int, hops: int = 1) -> LinkSample:
    """Held-out sample `index` with its (first) gold at `gold_position` (the same world and distractors at every
    position); `hops=2`: a two-hop question from its own seed stream."""
    stream = f"kvlink-eval:{seed}:{index}" if hops == 1 else f"kvlink-eval-2hop:{seed}:{index}"
    return qa_sample(random.Random(stream), docs, gold_position=gold_position, two_hop=hops == 2)


def _sync(model) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def answer_one(model, tokenizer, store, sample: LinkSample, mode: str, cfg: EvalConfig, links=None) -> dict:
    """Time to first token and the greedy answer of one sample in one mode."""
    template = use_template(tokenizer, cfg.template)
    docs, question, prefix = as_prompt(sample, template)
    opts = {"store": store, "template": template, "answer_prefix": prefix, "full": mode == "full",
            "links": links if mode == "links" else None, "recompute": cfg.recompute_k if mode == "recompute" else 0}
    req = tokenize(tokenizer, docs, [question], template, prefix)
    for ids in ([req.prefix] if req.prefix else []) + req.documents:
        store.get(ids)  # documents are encoded before the clock starts: TTFT of a request over stored documents
    ttft = None
    if cfg.ttft:
        _sync(model)
        t0 = time.perf_counter()
        prefill(model, tokenizer, docs, question, **opts)
        _sync(model)
        ttft = round((time.perf_counter() - t0) * 1000, 3)
    answer = generate(model, tokenizer, docs, question, max_new_tokens=cfg.max_new_tokens, **opts)
    return {"answer": answer, "score": best_subspan_em(answer, sample.answers), "ttft_ms": ttft}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (mode, gold position) and one per mode over every position (`gold_position` "all"): n, mean
    score with its 95% interval (Wilson: exact match is 0 or 1), median ttft_ms (None when not timed)."""
    from kvforge.eval.intervals import mean_interval

    groups: dict[tuple[str, int | str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["gold_position"]), []).append(r)
        groups.setdefault((r["mode"], "all"), []).append(r)
    out = []
    order = sorted(groups, key=lambda k: (MODES.index(k[0]), k[1] == "all", k[1] if k[1] != "all" else 0))
    for mode, pos in order:
        rs = groups[(mode, pos)]
        times = sorted(r["ttft_ms"] for r in rs if r.get("ttft_ms") is not None)
        lo, hi = mean_interval([r["score"] for r in rs], seed=f"{mode}/{pos}")
        out.append({"mode": mode, "gold_position": pos, "n": len(rs),
                    "score": round(sum(r["score"] for r in rs) / len(rs), 4), "ci_low": round(lo, 4),
                    "ci_high": round(hi, 4), "ttft_ms": round(times[len(times) // 2], 3) if times else None})
    return out


def write_summary(out: Path, rows: list[dict]) -> list[dict]:
    summary = summarize(rows)
    tmp = out / "summary.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        w.writerows(summary)
    tmp.replace(out / "summary.csv")
    _plot(summary, out / "summary.png")
    return summary


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, mode in enumerate(MODES):
        rs = [r for r in summary if r["mode"] == mode and r["gold_position"] != "all"]
        if rs:  # 95% intervals as error bars, modes side by side so the bars do not overlap
            x = [r["gold_position"] + 1 + 0.06 * (k - 1.5) for r in rs]
            y = [r["score"] for r in rs]
            err = [[r["score"] - r["ci_low"] for r in rs], [r["ci_high"] - r["score"] for r in rs]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=mode)
    ax.set_xlabel("gold document position (1 = first)")
    ax.set_ylabel("best-subspan exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_link_eval(model_name: str, links_dir: str | None, out, cfg: EvalConfig, *, dtype=None, device=None,
                  argv: list[str] | None = None, progress: bool = True, loaded: dict | None = None) -> list[dict]:
    """Run the evaluation into `out` (resuming what is there); returns the summary rows. `loaded`: already loaded
    {"base": (model, tokenizer), "links": (model, tokenizer)} (tests)."""
    from kvforge.models import load_model

    bad = [m for m in cfg.modes if m not in MODES]
    if bad:
        raise KVForgeError(f"unknown mode {bad[0]!r}; allowed: {', '.join(MODES)}")
    if "links" in cfg.modes and links_dir is None and not (loaded and "links" in loaded):
        raise KVForgeError("mode links needs --links DIR (a model saved by `kvforge train kvlink`)")
    if cfg.docs < 1 or cfg.samples < 1:
        raise KVForgeError(f"--docs {cfg.docs} --samples {cfg.samples}; allowed: both ≥ 1")
    if cfg.hops not in (1, 2) or cfg.docs < cfg.hops:
        raise KVForgeError(f"--hops {cfg.hops} with --docs {cfg.docs}; allowed: 1 or 2 hops, at least that many "
                           "documents")
    out = prepare_out(out)
    args = {"model": model_name, "links": links_dir, **asdict(cfg)}
    meta_path = out / "run_meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())["args"]
        keep = ("model", "links", "docs", "recompute_k", "max_new_tokens", "seed", "template", "hops")
        defaults = asdict(EvalConfig())  # keys added later (hops) hold their default in older runs
        changed = [k for k in keep if old.get(k, defaults.get(k)) != args.get(k)]
        if changed:
            raise KVForgeError(f"{str(out)!r} holds a run with another {changed[0]} ({old.get(changed[0])!r}); use "
                               "another --out")
    loaded = dict(loaded or {})
    if any(m != "links" for m in cfg.modes) and "base" not in loaded:
        loaded["base"] = load_model(model_name, dtype=dtype, device=device)
    if "links" in cfg.modes and "links" not in loaded:
        loaded["links"] = load_model(links_dir, dtype=dtype, device=device)
    links = load_links(*loaded["links"]) if "links" in loaded else None
    stores = {k: MemoryStore(m, t) for k, (m, t) in loaded.items()}
    some_model = next(iter(loaded.values()))[0]
    meta_path.write_text(json.dumps({"args": args, "argv": argv, "git_commit": git_commit(), "versions": versions(),
                                     "device": device_name(some_model)}, indent=2))
    results = out / "results.jsonl"
    drop_partial_line(results)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["mode"], r["sample"], r["gold_position"]) for r in rows}
    todo = [(i, p, m) for i in range(cfg.samples) for p in cfg.positions for m in cfg.modes if (m, i, p) not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="link eval", unit="answer")
    with results.open("a", encoding="utf-8") as sink:
        for i, p, mode in todo:
            which = "links" if mode == "links" else "base"
            model, tok = loaded[which]
            sample = eval_sample(cfg.seed, i, cfg.docs, p, cfg.hops)
            rec = {"mode": mode, "sample": i, "gold_position": p, "question": sample.question.rsplit(": ", 1)[-1],
                   "gold": sample.answers,
                   **answer_one(model, tok, stores[which], sample, mode, cfg, links if mode == "links" else None)}
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
            rows.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(mode=mode)
    if bar is not None:
        bar.close()
    return write_summary(out, rows)
