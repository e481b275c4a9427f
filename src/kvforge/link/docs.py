"""One document's KV, encoded alone from position 0: what the store keeps and `prefill` reuses.

A document is encoded by the engine (a `KVCache`, optionally compressed by a press) exactly as a context
would be, starting at position 0 and seeing nothing but itself. Per layer we keep what the cache holds:
- full-attention layers: every stored entry (all tokens, or what a press kept: per-entry logical slots and
  per-head validity come along);
- sliding-window layers (Gemma 3): transformers' layer keeps only the last `window - 1` tokens, and that is
  all a later token can ever see of this document, so that is what is kept (see docs/link.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvforge.cache import DenseLayer
from kvforge.config import text_config
from kvforge.errors import KVForgeError
from kvforge.generate import Encoded, prefill_context


@dataclass
class LayerKV:
    """The entries of one layer. keys `[1, H_kv, n, Dk]`, values `[1, H_kv, n, Dv]`; `slots [1, H_kv, n]` int64:
    the position (within the document) of each entry, or None when entry t is position `start + t`; `valid
    [1, H_kv, n]` bool, or None when every entry is valid (per-head budgets pad heads with invalid entries)."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    start: int = 0

    def positions(self) -> torch.Tensor:
        """`[1, H_kv, n]` int64 positions within the document."""
        if self.slots is not None:
            return self.slots
        b, h, n = self.keys.shape[:3]
        return torch.arange(self.start, self.start + n, device=self.keys.device).expand(b, h, n)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.slots, self.valid) if t is not None]


@dataclass
class DocKV:
    """A document's token ids and the KV of every layer (`layers[i]` for model layer i), encoded at position 0."""

    ids: tuple[int, ...]
    layers: list[LayerKV]

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def to(self, device) -> DocKV:
        """The same entries on `device` (no copy when already there)."""
        move = [LayerKV(*(None if t is None else t.to(device, non_blocking=True)
                          for t in (x.keys, x.values, x.slots, x.valid)), start=x.start) for x in self.layers]
        return DocKV(self.ids, move)


def encode_document(model, ids: list[int], press=None, tokenizer=None) -> DocKV:
    """Encode token ids alone from position 0 through a `KVCache` (compressed by `press` when given; presses with
    extra passes, like KVzip, get `tokenizer` for their prompts). Returns the document's `DocKV`."""
    if not ids:
        raise KVForgeError("a document has no tokens; give non-empty documents")
    device = next(model.parameters()).device
    ctx = torch.tensor([list(ids)], device=device)
    enc = Encoded(ctx, torch.ones_like(ctx), [[]], 0, tokenizer, False)
    cache = prefill_context(model, enc, press, max_new_tokens=0)
    layers = []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DenseLayer):
            keys, values, slots, valid = layer.entries()
            if bool(valid.all()):
                contiguous = bool((slots == torch.arange(keys.shape[2], device=slots.device)).all())
                slots = None if contiguous else slots.contiguous()
                layers.append(LayerKV(keys.contiguous(), values.contiguous(), slots))
            else:  # per-head budgets: padding entries zeroed, so equal documents give equal tensors (and files)
                pad = ~valid
                layers.append(LayerKV(keys.masked_fill(pad[..., None], 0), values.masked_fill(pad[..., None], 0),
                                      slots.masked_fill(pad, 0), valid.clone()))
        elif isinstance(layer, DynamicSlidingWindowLayer):
            keys, values = layer.keys.contiguous(), layer.values.contiguous()
            layers.append(LayerKV(keys, values, start=len(ids) - keys.shape[2]))
        else:
            raise KVForgeError(f"layer {i} is a {type(layer).__name__}; document reuse supports full-attention and "
                               "sliding-window layers")
    return DocKV(tuple(int(t) for t in ids), layers)


def model_identity(model) -> str:
    """A fingerprint of the weights a document's KV depends on: the text config (without paths and versions), the
    parameter dtype, and every parameter's name, shape and first and last 64 values. Hex sha256."""
    cfg = {k: v for k, v in text_config(model).to_dict().items()
           if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype", "torch_dtype",
                                                  "kvlink")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).cpu().contiguous()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_label(model) -> str:
    """A short human name for messages: the model's path, or its type."""
    return getattr(model, "name_or_path", "") or text_config(model).model_type
