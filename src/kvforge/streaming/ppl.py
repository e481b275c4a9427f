"""Next-token perplexity over long text, one token at a time through the cache (as StreamingLLM and KV-Align
measure it), per mode and cache size; `kvforge ppl` writes the table.

For T+1 ids x_0..x_T the T predictions of x_1..x_T are scored. `full`: the whole text in context (a chunked
forward through an ordinary cache), where it fits the model's positions.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvforge.cache.kvcache import KVCache
from kvforge.config import text_config
from kvforge.errors import KVForgeError
from kvforge.streaming.modes import AR
from kvforge.streaming.runner import Stream

COLUMNS = ["mode", "cache_size", "sinks", "bits", "tokens", "ppl", "seconds"]
Progress = Callable[[int], Any]  # called with the number of tokens just scored


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`[B, q, V]` logits, `[B, q]` targets -> `[B, q]` negative log-likelihoods (fp32)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -logp.gather(-1, targets[..., None].to(logp.device))[..., 0]


@torch.inference_mode()
def full_nll(model: Any, ids: torch.Tensor, chunk: int = 1024, progress: Progress | None = None) -> torch.Tensor:
    """`[B, T]` NLL of ids[:, 1:] with the whole text in context (chunked forward through one ordinary cache)."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit and ids.shape[1] - 1 > limit:
        raise KVForgeError(f"full context of {ids.shape[1] - 1} tokens exceeds the model's {limit} positions")
    ids = ids.to(model.device)
    cache, out = KVCache(model), []
    for a in range(0, ids.shape[1] - 1, chunk):
        b = min(a + chunk, ids.shape[1] - 1)
        logits = model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True).logits
        out.append(_nll(logits, ids[:, a + 1 : b + 1]))
        if progress:
            progress(b - a)
    return torch.cat(out, 1)


@torch.inference_mode()
def ar_nll(model: Any, ids: torch.Tensor, cache_size: int, batch: int = 8, progress: Progress | None = None
           ) -> torch.Tensor:
    """`[B, T]` NLL under `AR(cache_size)`: the prediction after token t comes from a plain forward over tokens
    t−N+1..t. Independent windows, so `batch` of them share one forward (same numbers as one at a time); rows one
    after the other."""
    if ids.shape[0] > 1:
        return torch.cat([ar_nll(model, row[None], cache_size, batch, progress) for row in ids])
    ids = ids.to(model.device)
    n, t = cache_size, ids.shape[1] - 1
    first = min(n, t)  # predictions 0..first-1 see the whole prefix: one forward
    out = [_nll(model(input_ids=ids[:, :first]).logits, ids[:, 1 : first + 1])[0]]
    if progress:
        progress(first)
    windows = ids[0, : t].unfold(0, n, 1)[1:] if t > n else ids[0, :0].view(0, n)  # window s ends at s + n - 1
    for a in range(0, windows.shape[0], batch):
        w = windows[a : a + batch]
        logits = model(input_ids=w, logits_to_keep=1).logits[:, -1]
        out.append(_nll(logits[:, None], ids[0, n + 1 + a : n + 1 + a + w.shape[0]][:, None])[:, 0])
        if progress:
            progress(w.shape[0])
    return torch.cat(out)[None]


@torch.inference_mode()
def stream_nll(model: Any, ids: torch.Tensor, mode: Any, progress: Progress | None = None,
               cuda_graph: bool = False) -> torch.Tensor:
    """`[B, T]` NLL of ids[:, 1:] fed through `Stream(model, mode)` (the first `cache_size` tokens in one forward,
    which scores the same as one at a time, then one token at a time)."""
    if isinstance(mode, AR):
        return ar_nll(model, ids, mode.cache_size, progress=progress)
    stream, t = Stream(model, mode, cuda_graph=cuda_graph), ids.shape[1] - 1
    first = min(mode.cache_size, t)
    out = [_nll(stream.step(ids[:, :first]), ids[:, 1 : first + 1])]
    if progress:
        progress(first)
    for i in range(first, t):
        out.append(_nll(stream.step(ids[:, i : i + 1]), ids[:, i + 1 : i + 2]))
        if progress:
            progress(1)
    return torch.cat(out, 1)


def perplexity(nll: torch.Tensor) -> float:
    return float(torch.exp(nll.double().mean()))


# -- the `kvforge ppl` table -----------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    """Atomic: a temporary file renamed over the old one, so an interrupt never leaves half a table."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((int(r["cache_size"]), float(r["ppl"])) for r in rows if r["mode"] == mode)
        if mode == "full":
            ax.axhline(pts[0][1], color="k", ls=":", label="full")
        else:
            ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set(xscale="log", yscale="log", xlabel="cache size (entries)", ylabel="perplexity", title=title)
    ax.set_xticks(sorted({int(r["cache_size"]) for r in rows if r["mode"] != "full"}) or [1])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def split_rows(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """`[1, T+1]` ids -> `[rows, T/rows + 1]`: consecutive segments sharing their boundary token, so the rows' T
    predictions are the text's T predictions, each row streamed from its own start."""
    t = ids.shape[1] - 1
    if rows < 1 or t % rows:
        raise KVForgeError(f"--rows {rows} does not divide --tokens {t}; allowed: a divisor of the token count")
    n = t // rows
    return torch.stack([ids[0, r * n : r * n + n + 1] for r in range(rows)])


def run_ppl(model: Any, tokenizer: Any, text: str, tokens: int, modes: list[str], cache_sizes: list[int],
            sinks: int, out: str | os.PathLike, nets: Any = None, meta: dict | None = None,
            progress: bool = True, rows: int = 1, cuda_graph: bool = False, bits: int = 16) -> list[dict]:
    """Score `tokens` predictions of `text` for every mode × cache size (`full` once), appending rows to
    DIR/ppl.csv as they finish; rows already there (same mode, cache size, sinks, tokens) are kept, not re-run.
    `rows` > 1 streams that many consecutive segments of the text side by side (a batch; `full` is then each
    segment in context). `cuda_graph`: replay one captured step per token once a cache is full (same numbers).
    `bits` < 16: the sw/window/kv caches store quantized entries (`ar` and `full` keep none: always 16).
    Also DIR/ppl.png and DIR/run_meta.json. Returns the table."""
    from tqdm import tqdm

    from kvforge.eval.runs import prepare_out
    from kvforge.streaming.data import tokenize
    from kvforge.streaming.modes import make_mode

    out = prepare_out(out)
    ids = split_rows(tokenize(tokenizer, text, tokens + 1), rows)
    table, path = read_rows(out / "ppl.csv"), out / "ppl.csv"
    old = json.loads((out / "run_meta.json").read_text()) if (out / "run_meta.json").exists() and table else {}
    if table and old.get("rows", 1) != rows:
        raise KVForgeError(f"{out}/ppl.csv was measured with --rows {old.get('rows', 1)}; resume with the same "
                           "--rows or use another --out")
    for r in table:  # tables written before the bits column: entries as computed
        r.setdefault("bits", "16")
    done = {(r["mode"], r["cache_size"], r["sinks"], r["bits"], r["tokens"]) for r in table}
    (out / "run_meta.json").write_text(json.dumps({**(meta or {}), "rows": rows}, indent=1))
    limit = getattr(text_config(model), "max_position_embeddings", None)
    jobs = [(m, c) for m in modes for c in ([ids.shape[1]] if m == "full" else cache_sizes)]
    for mode_name, size in jobs:
        n_sink = sinks if mode_name in ("sw", "kv") else 0
        row_bits = bits if mode_name in ("sw", "kv", "window") else 16
        if (mode_name, str(size), str(n_sink), str(row_bits), str(tokens)) in done:
            continue
        if mode_name == "full" and limit and ids.shape[1] - 1 > limit:
            print(f"full: skipped, {ids.shape[1] - 1} tokens exceed the model's {limit} positions", file=sys.stderr)
            continue
        bar = tqdm(total=ids.shape[1] - 1, desc=f"{mode_name} {size}", unit="step", disable=not progress,
                   leave=False)
        t0 = time.perf_counter()
        if mode_name == "full":
            nll = full_nll(model, ids, progress=bar.update)
        else:
            nll = stream_nll(model, ids, make_mode(mode_name, size, n_sink, nets, bits=row_bits),
                             progress=bar.update, cuda_graph=cuda_graph)
        bar.close()
        row = {"mode": mode_name, "cache_size": size, "sinks": n_sink, "bits": row_bits, "tokens": tokens,
               "ppl": f"{perplexity(nll):.4f}", "seconds": f"{time.perf_counter() - t0:.1f}"}
        print(",".join(str(row[c]) for c in COLUMNS), flush=True)
        table.append(row)
        write_rows(path, table)
    if table:
        plot(table, out / "ppl.png", f"{(meta or {}).get('model', '')} — {tokens} tokens")
    return table
