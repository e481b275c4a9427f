"""`Stream`: feed token ids through a model under a streaming mode and get next-token logits back.

A streaming cache takes one forward of at most `cache_size` tokens while it fills, then one token at a time
(each step evicts one window token); `Stream.step` does that chunking. `AR` keeps the last `cache_size − 1`
ids and runs a plain forward over them plus the new token.

With `cuda_graph=True`, once the cache is full every later one-token step is one replay of a CUDA graph: nothing
about the step's shapes changes from then on, and the cache's layers keep their counters on the device
(`SinkWindowLayer.enter_graph_mode`). The first full step runs eagerly (warm-up), the next is captured. On CPU the
same graph-mode code runs eagerly (what the tests compare with the ordinary path).
"""

from __future__ import annotations

from typing import Any

import torch

from kvforge.cache.graphs import side_stream
from kvforge.errors import KVForgeError
from kvforge.streaming.modes import AR


class Stream:
    """One streaming session of `model` under `mode` (`SW`, `Window`, `KV`, `AR`) for a batch of equal-length rows."""

    def __init__(self, model: Any, mode: Any, cuda_graph: bool = False):
        mode.check(model)
        self.model, self.mode = model, mode
        self.cache = mode.cache(model)
        self.history: torch.Tensor | None = None  # AR: the last cache_size - 1 ids `[B, ≤ N-1]`
        self.seen = 0
        self.cuda_graph = cuda_graph and self.cache is not None
        self._tok: torch.Tensor | None = None  # graph mode: the static input `[B, 1]`
        self._graph = None
        self._logits: torch.Tensor | None = None

    def _advance(self) -> None:
        for layer in self.cache.layers:
            layer.advance(1)

    def _graph_step(self, ids: torch.Tensor) -> torch.Tensor:
        """One token `[B, 1]` through the full cache in graph mode -> logits `[B, 1, V]`."""
        if self._tok is None:
            for layer in self.cache.layers:
                layer.enter_graph_mode()
            self._tok = ids.clone()
        self._tok.copy_(ids)
        if self._graph is not None:
            self._graph.replay()
            self._advance()
            return self._logits.clone()  # the static buffer is overwritten by the next replay
        if self.model.device.type != "cuda":  # CPU: graph mode, run eagerly
            logits = self._forward(self._tok, self.cache)
            self._advance()
            return logits
        side = side_stream(self._tok.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up step, eager
            logits = self._forward(self._tok, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self._advance()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, stream=side):  # recorded, not run: the next call replays it
            self._logits = self._forward(self._tok, self.cache)
        return logits

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
                for t in range(first, ids_all.shape[1]):  # clone: a view would keep the window's logits alive
                    outs.append(self._forward(ids_all[:, max(0, t + 1 - n) : t + 1], None)[:, -1:].clone())
            self.history = ids_all[:, -(n - 1) :] if n > 1 else ids_all[:, :0]
        else:
            at = 0
            room = n - self.seen
            if room > 1:  # fill: one forward of up to the free room
                at = min(room, ids.shape[1])
                outs.append(self._forward(ids[:, :at], self.cache))
            for t in range(at, ids.shape[1]):
                if self.cuda_graph and self.seen + t >= n:  # the cache is full: a graph step
                    outs.append(self._graph_step(ids[:, t : t + 1]))
                else:
                    outs.append(self._forward(ids[:, t : t + 1], self.cache))
        self.seen += ids.shape[1]
        return torch.cat(outs, 1)
