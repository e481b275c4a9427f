"""`RingLayer`: a stock sliding-window layer in graph mode (`kvforge.cache.graphs.GraphDecoder`).

transformers' `DynamicSlidingWindowLayer` keeps the last `window - 1` tokens and concatenates each new one,
so shapes change every step and it cannot be captured. While a graph decoder runs, each such layer is swapped
for a ring `[B, H_kv, window, D]`: step t writes slot t mod window, and attention reads every filled slot (the
current token and the `window - 1` before it, the sliding mask's span). The ring's order does not matter —
softmax over a set of keys is the same in any order — so no roll is ever needed. On exit the ring goes back
into the stock layer in time order.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvforge.cache.layers import DenseLayer


class RingLayer(DenseLayer):
    """Graph-mode ring of the last `window` tokens of every row (rows must hold the same number of tokens: no
    padding). Built by `from_stock`, handed back by `to_stock`."""

    is_sliding = True
    compressible = False

    @classmethod
    def from_stock(cls, stock: DynamicSlidingWindowLayer, steps: int) -> RingLayer:
        keys, values = stock.keys, stock.values  # [B, H_kv, m, D], m <= window - 1
        m = keys.shape[2]
        ring = cls.from_entries(keys, values, logical=stock.cumulative_length, reserve=stock.sliding_window - m)
        ring.stock, ring.window, ring.written = stock, stock.sliding_window, m
        ring.enter_graph_mode(steps)
        return ring

    def enter_graph_mode(self, steps: int) -> None:
        """The dense layer's graph state (next slot m, lengths m, segment offsets); a ring never runs out of
        room, so none is checked."""
        self._k[:, :, self.n :].zero_()  # the spare slots hold no NaN before they are written
        self._v[:, :, self.n :].zero_()
        super().enter_graph_mode(0)
        self.graph["limit"] = self.logical + steps

    def graph_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        g = self.graph
        self._k.index_copy_(2, g["pos"], key_states)
        self._v.index_copy_(2, g["pos"], value_states)
        g["pos"].add_(1).remainder_(self.window)
        g["lengths"].add_(1).clamp_(max=self.window)
        return self._k, self._v

    def graph_segments(self):
        b, h = self._k.shape[:2]
        g = self.graph
        return (self._k.view(b * h * self.window, -1), self._v.view(b * h * self.window, -1), g["offsets"],
                g["lengths"], self.window, b * h * self.window)

    def advance(self, q: int = 1) -> None:
        self.written += q
        self.n = min(self.written, self.window)
        self.logical += q

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window, 0  # the span a step attends (its mask is not used in graph mode)

    def _sync_views(self) -> None:
        self.keys, self.values = self._k, self._v

    def to_stock(self) -> DynamicSlidingWindowLayer:
        """The stock layer again, holding the last `window - 1` tokens in time order."""
        w, m = self.window, self.written
        order = torch.arange(m - min(m, w - 1), m, device=self.device) % w  # oldest first
        self.stock.keys = self._k.index_select(2, order)
        self.stock.values = self._v.index_select(2, order)
        self.stock.cumulative_length = self.logical
        return self.stock
