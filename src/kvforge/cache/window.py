"""`WindowLayer`: transformers' sliding-window layer, appending in place instead of concatenating every step.

transformers' `DynamicSlidingWindowLayer.update` builds `cat(stored, new)` and keeps its last `window - 1` tokens:
every decoding step reads and writes the whole window of every sliding layer. On an H200, for YOCO at 128 rows
(Llama-3.1-8B shapes, 16 sliding layers of 1,024 tokens), those concatenations were 26 of the 44 ms of GPU time per
step (`benchmarks/results/h200_1207c/profile_sharing_decode.json`).

This layer keeps the window in a buffer with `slack` spare columns and writes each new token after the last one; only
when the spare room is used up does it move the last `window - 1` tokens into a new buffer, once every `slack` steps.
What it returns, what it exposes as `keys`/`values` (the last `window - 1` tokens, as views), its
`cumulative_length` and its mask sizes are the stock layer's, exactly (`tests/test_window_layer.py` runs both side by
side); the price is `slack` columns per layer (`max(64, window / 16)`: 6% of a 1,024-token window).

Written entries are never overwritten: a new buffer is allocated when the room is used up, so views handed out
earlier (a `KVCache.snapshot()`, a `fork()`, a `KVView` of the sharing model) keep their contents. Whenever `keys` is
not the view this layer last published (restored from a snapshot, concatenated by `KVCache.stack`, set back by a
graph decoder's ring, cropped or reordered by transformers), or the layer is a shallow copy of another (a fork), the
next update starts a buffer of its own from `keys`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer


class WindowLayer(DynamicSlidingWindowLayer):
    """A `DynamicSlidingWindowLayer` whose decoding steps append in place (module docstring)."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window, **kwargs)
        self.slack = max(64, sliding_window // 16)
        self._buf: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, H_kv, cap, D] keys, values
        self._n = 0  # filled columns of the buffer
        self._owner: int | None = None  # id() of the layer that allocated the buffer (a shallow copy must not write)
        self._published: torch.Tensor | None = None  # the `keys` view this layer last set

    def _start(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """A new buffer holding `keys`/`values` `[B, H_kv, m, D]` followed by at least `room` free columns.

        Sizing prefill chunks' buffers differently (exactly the stock layer's sizes, or one size per chunk length)
        did not change what ran YOCO at 384 rows out of memory on an H100: 57.5 GiB allocated of 74.5 and 77.2 GiB
        reserved, the allocator's fragmentation; `expandable_segments` fits it at the stock layer's peak
        (docs/sharing.md)."""
        m = keys.shape[2]
        cap = max(self.sliding_window - 1 + self.slack, m + room)
        k = keys.new_empty(keys.shape[0], keys.shape[1], cap, keys.shape[3])
        v = values.new_empty(values.shape[0], values.shape[1], cap, values.shape[3])
        k[:, :, :m] = keys
        v[:, :, :m] = values
        self._buf, self._n, self._owner = (k, v), m, id(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `key_states`/`value_states` `[B, H_kv, q, D]`; return the stored window (at most `window - 1`
        tokens) followed by the q new ones, as the stock layer does."""
        if self.record_past:  # assisted decoding's mode: the stock behaviour, buffers dropped
            self._buf, self._published = None, None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self._buf is None or self._owner != id(self) or self.keys is not self._published:
            if self.keys is None or self.keys.dim() != 4:  # just initialised: transformers' 1-D empty tensors
                self._start(key_states[:, :, :0], value_states[:, :, :0], q)
            else:
                self._start(self.keys, self.values, q)
        k, v = self._buf
        stored = min(self.cumulative_length, self.sliding_window - 1)  # what the stock layer holds now
        if self._n + q > k.shape[2]:  # room used up: the stored window moves into a new buffer
            self._start(k[:, :, self._n - stored : self._n], v[:, :, self._n - stored : self._n], q)
            k, v = self._buf
        k[:, :, self._n : self._n + q] = key_states
        v[:, :, self._n : self._n + q] = value_states
        self._n += q
        self.cumulative_length += q
        keep = min(self.cumulative_length, self.sliding_window - 1)
        self.keys, self.values = k[:, :, self._n - keep : self._n], v[:, :, self._n - keep : self._n]
        self._published = self.keys
        return k[:, :, self._n - stored - q : self._n], v[:, :, self._n - stored - q : self._n]

    def allocated_bytes(self) -> int:
        """Bytes of the buffers (the spare columns included); the stored window's when none is allocated yet."""
        if self._buf is not None and self._owner == id(self):
            return sum(t.numel() * t.element_size() for t in self._buf)
        if self.keys is None or not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self) -> None:
        super().reset()
        self._buf, self._n, self._published = None, 0, None
