"""Continued pre-training of a KV-sharing model with the parallel iterative forward, and held-out perplexity.

`train()` is resumable: it keeps one checkpoint (model, optimizer, step) under `out/checkpoint`, written to a
temporary folder and renamed into place, and draws the batch of step s from a generator seeded with (seed, s), so a
run stopped and started again with the same command follows the same path as one that never stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvforge.errors import KVForgeError
from kvforge.models import resolve_device, resolve_dtype
from kvforge.sharing.configuration import MODEL_TYPE


def token_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`ids [N]` cut into `[N // seq_len, seq_len]` (the tail dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise KVForgeError(f"the text has {ids.numel()} tokens, fewer than one block of --seq-len {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, **forward_kwargs) -> float:
    """exp(mean next-token loss) over `blocks [n, L]` (each block on its own, no cache). `forward_kwargs` go to the
    model (e.g. `num_iterations` for a shared-KV model; none for a plain one)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        loss = model(batch, labels=batch, use_cache=False, **forward_kwargs).loss
        nll += float(loss) * batch.shape[0] * (batch.shape[1] - 1)
        count += batch.shape[0] * (batch.shape[1] - 1)
    return math.exp(nll / count)


def split_text(tokenizer, text: str, seq_len: int, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks): the last `eval_fraction` of the tokens are held out."""
    ids = torch.tensor(tokenizer(text).input_ids)
    cut = int(ids.numel() * (1 - eval_fraction))
    return token_blocks(ids[:cut], seq_len), token_blocks(ids[cut:], seq_len)


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(out: Path, model, tokenizer, optimizer, step: int, state: dict) -> None:
    tmp = out / ".checkpoint-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state | {"step": step}))
    old = out / "checkpoint"
    if old.exists():
        os.replace(old, out / ".checkpoint-old")
    os.replace(tmp, old)
    shutil.rmtree(out / ".checkpoint-old", ignore_errors=True)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(model_dir: str, text_file: str, steps: int, out: str, seq_len: int = 256, batch_size: int = 8,
          lr: float = 1e-4, warmup: int = 10, save_every: int = 100, eval_fraction: float = 0.1, seed: int = 0,
          device: str | None = None, dtype: str | None = None, num_iterations: int | None = None,
          progress: bool = True) -> dict:
    """Continue pre-training the shared-KV model in `model_dir` on `text_file` for `steps` optimizer steps (AdamW,
    warm-up + cosine, gradient clipping 1.0), parallel forward (`num_iterations` passes, default the config's
    m + b, gradient through the last b). Writes to `out`: `loss.csv` (step, loss, lr, seconds), `loss.png`, the final
    model + tokenizer, `metrics.json` (held-out perplexity before and after, wall time). Re-running the same command
    resumes from `out/checkpoint`. Returns the metrics."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device or "auto")
    dtype = resolve_dtype(dtype or "float32", device)
    if steps < 1:
        raise KVForgeError(f"--steps {steps}; give at least 1")
    ckpt = out_dir / "checkpoint"
    resume = (ckpt / "state.json").is_file()
    src = ckpt if resume else Path(model_dir)
    if not (src / "config.json").is_file():
        raise KVForgeError(f"no model at {str(src)!r} (config.json missing); convert one with `kvforge convert lckv`")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device)
    if model.config.model_type != MODEL_TYPE:
        raise KVForgeError(f"{model_dir!r} is a {model.config.model_type!r} model; train lckv needs a shared-KV model "
                           "(make one with `kvforge convert lckv`)")
    tokenizer = AutoTokenizer.from_pretrained(src)
    train_blocks, eval_blocks = split_text(tokenizer, Path(text_file).read_text(encoding="utf-8"), seq_len,
                                           eval_fraction)
    fwd = {"num_iterations": num_iterations, "sequential": False}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    state = json.loads((ckpt / "state.json").read_text()) if resume else {}
    start = state.get("step", 0)
    if resume:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device))
    else:
        model.eval()
        state = {"ppl_before": perplexity(model, eval_blocks, batch_size, **fwd), "seconds": 0.0}

    log_path = out_dir / "loss.csv"
    rows = []
    if resume and log_path.is_file():
        with log_path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
    from tqdm import tqdm

    model.train()
    t0, spent = time.perf_counter(), state["seconds"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train lckv", disable=not progress)
    for step in bar:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        batch = train_blocks[torch.randint(len(train_blocks), (batch_size,), generator=g)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup)
        loss = model(batch, labels=batch, use_cache=False, **fwd).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds, value = spent + time.perf_counter() - t0, float(loss.detach())
        rows.append({"step": step + 1, "loss": f"{value:.6f}", "lr": f"{optimizer.param_groups[0]['lr']:.3e}",
                     "seconds": f"{seconds:.2f}"})
        bar.set_postfix(loss=f"{value:.3f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            with log_path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "seconds"])
                w.writeheader()
                w.writerows(rows)
            _save_checkpoint(out_dir, model, tokenizer, optimizer, step + 1, state | {"seconds": seconds})
    model.eval()
    metrics = {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
               "wall_seconds": round(spent + time.perf_counter() - t0, 2), "ppl_before": state["ppl_before"],
               "ppl_after": perplexity(model, eval_blocks, batch_size, **fwd), "eval_tokens": eval_blocks.numel(),
               "num_iterations": num_iterations or model.config.forward_passes + model.config.backward_passes}
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(rows, out_dir / "loss.png")
    return metrics
