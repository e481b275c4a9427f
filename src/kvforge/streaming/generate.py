"""Endless generation from a fixed-size cache (`kvforge stream`): tokens printed as they come, per-1k-token latency
and memory recorded, optionally the `ar` speed on the same prompt for a same-run ratio."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvforge.streaming.modes import AR
from kvforge.streaming.runner import Stream

BLOCK = 1000  # tokens per latency record
PROGRESS = 10_000  # tokens per progress line of `kvforge stream --quiet`
LATENCY_COLUMNS = ["tokens", "ms_per_token", "memory_bytes", "cache_bytes"]


class TextSink:
    """Turns token ids into printable text as they arrive (waits while a multi-byte character is incomplete)."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], Any]):
        self.tokenizer, self.emit = tokenizer, emit
        self.pending: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.emit(text[self.printed :])
        self.printed = len(text)
        if len(self.pending) > 32:
            self.pending, self.printed = [], 0


def memory_bytes(device: torch.device) -> int:
    """Bytes allocated on the GPU, or the process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cache_bytes(stream: Stream) -> int:
    return 0 if stream.cache is None else sum(layer.stored_bytes() for layer in stream.cache.layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick(logits: torch.Tensor, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids `[B, 1]` from logits `[B, V]`: greedy, or sampled from the top k."""
    if not top_k:
        return logits.argmax(-1, keepdim=True)
    vals, idx = logits.float().topk(top_k, -1)
    choice = torch.multinomial(torch.softmax(vals, -1).cpu(), 1, generator=generator).to(idx.device)
    return idx.gather(-1, choice)


def run_stream(model: Any, tokenizer: Any, mode: Any, prompt: str, num_tokens: int,
               emit: Callable[[str], Any] | None = print, top_k: int | None = None, seed: int = 0,
               records: list | None = None, cuda_graph: bool = False,
               on_block: Callable[[list], Any] | None = None) -> dict:
    """Generate `num_tokens` tokens after `prompt` under `mode`; `emit` gets the text as it streams (None: silent).
    Appends one record per `BLOCK` tokens to `records` (tokens so far, ms per token over the block, memory, cache
    bytes) and then calls `on_block(records)` (the CLI writes latency.csv there, so a stopped run keeps its blocks).
    `cuda_graph`: one captured step replayed per token once the cache is full. Returns a summary: tokens/s, ms per
    token, peak memory, cache bytes."""
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else None
    if ids is None or ids.shape[1] == 0:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[bos]])
    prompt_tokens = ids.shape[1]
    if isinstance(mode, AR):  # ar's first token is one forward over the prompt's last n tokens (the earlier ones'
        ids = ids[:, -mode.cache_size :]  # logits are never used): not one window forward per prompt token
    sink = TextSink(tokenizer, emit) if emit else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stream = Stream(model, mode, cuda_graph=cuda_graph)
    t0 = time.perf_counter()
    logits = stream.step(ids)[:, -1]
    _sync(device)
    t_start = block_start = time.perf_counter()
    ttft = t_start - t0
    for i in range(1, num_tokens + 1):
        tok = pick(logits, top_k, generator)
        if sink:
            sink.add(int(tok[0, 0]))
        logits = stream.step(tok)[:, -1]
        if records is not None and i % BLOCK == 0:
            _sync(device)
            now = time.perf_counter()
            records.append({"tokens": i, "ms_per_token": f"{(now - block_start) * 1000 / BLOCK:.3f}",
                            "memory_bytes": memory_bytes(device), "cache_bytes": cache_bytes(stream)})
            block_start = now
            if on_block is not None:
                on_block(records)
    _sync(device)
    total = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else memory_bytes(device)
    return {"mode": mode.name, "cache_size": mode.cache_size, "sinks": getattr(mode, "n_sink", 0),
            "tokens": num_tokens, "prompt_tokens": prompt_tokens, "first_token_s": round(ttft, 4),
            "tokens_per_s": round(num_tokens / total, 2), "ms_per_token": round(total * 1000 / num_tokens, 3),
            "peak_memory_bytes": peak, "cache_bytes": cache_bytes(stream)}


def write_latency_csv(out: Path, records: list[dict]) -> None:
    """DIR/latency.csv (one row per 1k tokens so far), written atomically."""
    tmp = out / "latency.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LATENCY_COLUMNS)
        w.writeheader()
        w.writerows(records)
    os.replace(tmp, out / "latency.csv")


def write_latency(out: Path, records: list[dict], summary: dict, meta: dict) -> None:
    """DIR/latency.csv (one row per 1k tokens), DIR/summary.json, DIR/run_meta.json — each written atomically."""
    write_latency_csv(out, records)
    for name, data in (("summary.json", summary), ("run_meta.json", meta)):
        (out / (name + ".tmp")).write_text(json.dumps(data, indent=1))
        os.replace(out / (name + ".tmp"), out / name)


def compare_ar(model: Any, tokenizer: Any, prompt: str, cache_size: int, num_tokens: int, top_k: int | None,
               seed: int) -> dict:
    """The `ar` summary on the same prompt and cache size (for a same-run speed ratio)."""
    return run_stream(model, tokenizer, AR(cache_size), prompt, num_tokens, emit=None, top_k=top_k, seed=seed)
