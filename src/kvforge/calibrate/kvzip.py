"""Offline KVzip head scores (`kvforge kvzip-head-scores`) for the press's `level="head"`.

As in the paper: a head's score is the largest pair-level KVzip score it gives any context token, maxed
over a calibration set (here the contexts of the generated `facts_qa` task). Heads with low scores are the
ones that never need the context to reconstruct it; `kvzip(level="head")` drops their context KV whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvforge.errors import KVForgeError


def compute_head_scores(model, tokenizer, length: int = 1000, samples: int = 4, seed: int = 0,
                        chunk_size: int = 2000, progress: bool = False) -> torch.Tensor:
    """Head scores `[L_compressible, H_kv]`: max over `samples` facts_qa contexts of `length` tokens of the
    pair-level KVzip scores, max over the context tokens (the protected prefix excluded)."""
    from kvforge.eval.tasks import make_samples
    from kvforge.generate import encode, model_max_length, prefill_context
    from kvforge.presses.kvzip import kvzip_scores

    if samples < 1 or length < 1:
        raise KVForgeError(f"kvzip-head-scores: --samples ({samples}) and --length ({length}) must be positive")
    limit = model_max_length(model)
    if limit and length >= limit:
        raise KVForgeError(f"kvzip-head-scores: --length {length} does not fit the model's {limit} positions "
                           "(with a question); use a shorter --length")
    best = None
    for i, s in enumerate(make_samples("facts_qa", tokenizer, length, samples, seed)):
        enc = encode(model, tokenizer, [s.context], [s.questions[:1]], s.answer_prefix)
        cache = prefill_context(model, enc, None, max_new_tokens=1)
        sc = kvzip_scores(model, cache, enc, chunk_size=chunk_size)[:, 0]  # [L, H, W]
        sc = sc.masked_fill(~torch.isfinite(sc), float("-inf")).amax(-1).float().cpu()
        best = sc if best is None else torch.maximum(best, sc)
        if progress:
            print(f"sample {i + 1}/{samples}: {enc.ctx_ids.shape[1]} tokens", flush=True)
    return best


def save_head_scores(path: str | Path, scores: torch.Tensor, **meta) -> Path:
    """Write `{"scores": [[...]], **meta}` as JSON (what `kvzip(head_scores_path=...)` reads)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**meta, "shape": list(scores.shape), "scores": scores.tolist()}, indent=1))
    except OSError as e:
        raise KVForgeError(f"cannot write head scores to {str(path)!r}: {e.strerror}") from None
    return path
