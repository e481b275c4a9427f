"""Composed: apply several presses one after the other on the same layer (kvpress's ComposedPress).

`get_press("composed", presses=["snapkv", "knorm"], compression_ratio=0.5)` runs SnapKV on a layer, then Knorm
on what SnapKV kept. Each press's ratio applies to what the previous one left, so two presses at ratios r1 and
r2 keep about `n·(1 − r1)·(1 − r2)` entries (0.5 and 0.5 keep a quarter).

Presses are given as registered names or instances. Names are built with the composed press's own
`compression_ratio` / `budget` when one was given, else with their defaults; instances keep their own
options. The composed press's ratio is not applied a second time.

This is also how quantizers compose with pruning (e.g. `presses=[snapkv, some_quantizer]`): the composed press
only calls each press's `compress(ctx)` in order, with a fresh `LayerContext` of the same layer before every
step (the previous press changed the entries, and perhaps the layer object, e.g. to head-varlen). Its hooks call
every inner press's hook in order (the no-op defaults included), and its flags are the OR of theirs:

- `after_prefill(model, cache, enc)`: each inner press's, in order, after the prefill (all `compress` steps
  have run by then);
- `on_decode(ctx)`: each inner press's, in order, with a fresh context after each one that acts;
- `select(ctx)`: the entries every inner selecting press chose (logical AND; None from all = no restriction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, Press, overrides
from kvforge.presses.registry import get_press, register


def _refresh(ctx: LayerContext) -> LayerContext:
    return LayerContext(ctx.module, ctx.cache, ctx.layer_idx, ctx.query, ctx.attention_mask, ctx.scaling)


@register("composed")
@dataclass
class ComposedPress(Press):
    """`presses`: a list of press names or instances applied in order to each layer's entries `[B, H_kv, n, D]`;
    each one's ratio applies to what the previous ones left. Hooks (`after_prefill`, `on_decode`, `select`)
    call the inner presses' in order; `acts_while_decoding` / `has_extra_pass` are true when one inner press's is."""

    kind = "wrapper"
    frees_memory = "as its presses"
    extra_passes = "as its presses"
    paper = "kvpress ComposedPress (https://github.com/NVIDIA/kvpress)"
    presses: list = field(default_factory=list)

    def __post_init__(self):
        given = {}
        if self.compression_ratio is not None:
            given["compression_ratio"] = self.compression_ratio
        if self.budget is not None:
            given["budget"] = self.budget
        super().__post_init__()
        if isinstance(self.presses, (str, Press)):
            self.presses = [self.presses]
        if not isinstance(self.presses, (list, tuple)):
            raise KVForgeError(f"composed: presses={self.presses!r}; give a list of press names or press instances")
        if not self.presses:
            raise KVForgeError("composed: presses is empty; give a list of press names or press instances")
        built = []
        for p in self.presses:
            if isinstance(p, str):
                if p == "composed":
                    raise KVForgeError("composed: a composed press cannot contain 'composed' by name")
                p = get_press(p, **given)
            if not isinstance(p, Press):
                raise KVForgeError(f"composed: presses must be press names or instances, got {type(p).__name__}")
            built.append(p)
        self.presses = built

    def compress(self, ctx: LayerContext) -> None:
        for i, press in enumerate(self.presses):
            press.compress(ctx if i == 0 else _refresh(ctx))

    @property
    def acts_while_decoding(self) -> bool:
        return any(p.acts_while_decoding for p in self.presses)

    @property
    def has_extra_pass(self) -> bool:
        return any(p.has_extra_pass for p in self.presses)

    def after_prefill(self, model, cache, enc) -> None:
        for p in self.presses:
            p.after_prefill(model, cache, enc)

    def on_decode(self, ctx: LayerContext) -> None:
        fresh = ctx
        for p in self.presses:
            p.on_decode(fresh)
            if overrides(p, "on_decode"):  # it may have changed the entries: the next one sees a new context
                fresh = _refresh(ctx)

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        chosen = None
        for p in self.presses:
            c = p.select(ctx)
            if c is not None:
                chosen = c if chosen is None else chosen & c
        return chosen
