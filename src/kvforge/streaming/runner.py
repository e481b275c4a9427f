"""`Stream`: feed token ids through a model under a streaming mode and get next-token logits back.

A streaming cache takes one forward of at most `cache_size` tokens while it fills, then one token at a time
(each step evicts one window token); `Stream.step` does that chunking. `AR` keeps the last `cache_size − 1`
ids and runs a plain forward over them plus the new token.
"""

from __future__ import annotations

from typing import Any

import torch

from kvforge.errors import KVForgeError
from kvforge.streaming.modes import AR


class Stream:
    """One streaming session of `model` under `mode` (`SW`, `Window`, `KV`, `AR`) for a batch of equal-length rows."""

    def __init__(self, model: Any, mode: Any):
        mode.check(model)
        self.model, self.mode = model, mode
        self.cache = mode.cache(model)
        self.history: torch.Tensor | None = None  # AR: the last cache_size - 1 ids `[B, ≤ N-1]`
        self.seen = 0

    def _forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
        return out.logits

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ids `[B, q]`; returns the logits after each of them `[B, q, V]` (model dtype)."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise KVForgeError(f"ids of shape {tuple(ids.shape)}; allowed: [batch, tokens] with tokens ≥ 1")
        ids = ids.to(self.model.device)
        n = self.mode.cache_size
        outs = []
        if isinstance(self.mode, AR):
            ids_all = ids if self.history is None else torch.cat([self.history, ids], 1)
            first = ids_all.shape[1] - ids.shape[1]  # index of the first new token in ids_all
            if ids_all.shape[1] <= n:  # the whole history fits: one forward
                outs.append(self._forward(ids_all, None)[:, first:])
            else:
                for t in range(first, ids_all.shape[1]):
                    outs.append(self._forward(ids_all[:, max(0, t + 1 - n) : t + 1], None)[:, -1:])
            self.history = ids_all[:, -(n - 1) :] if n > 1 else ids_all[:, :0]
        else:
            at = 0
            room = n - self.seen
            if room > 1:  # fill: one forward of up to the free room
                at = min(room, ids.shape[1])
                outs.append(self._forward(ids[:, :at], self.cache))
            for t in range(at, ids.shape[1]):
                outs.append(self._forward(ids[:, t : t + 1], self.cache))
        self.seen += ids.shape[1]
        return torch.cat(outs, 1)
