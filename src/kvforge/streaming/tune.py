"""Training KV-Align networks on the loss they are for: the next-token loss of text streamed through `KV` mode, with
gradients through the frozen model into the networks (`kvforge train kv-align --lm-steps N`).

Why (docs/streaming.md, "KV-Align"): the reference trains the networks on the K/V error, and on the GPT-2 trained
here a 7× lower K/V error at cache 256 still made next-token loss worse at every strength. What a user measures is
perplexity, so this stage optimises it directly.

How: for every cache size C one stream of `rows` text rows runs through a `KV(C)` cache with the networks in the
loop at full strength — the same layer and the same reads as inference, and on-policy: entries stored after an
eviction were computed by a model that attended to aligned entries, as at inference. Each step feeds one token
per row with autograd on, scores the next token (cross-entropy, the quantity `kvforge ppl` reports) and
backpropagates through the model, whose weights stay frozen, into the networks. One optimiser step sums one step of
every size's stream, so all sizes train at once. A stream starts at random places of the training text (filled
without gradient) and runs 2·W steps after its cache is full — the shifts of the filling transition and of the
steady state — then restarts elsewhere. The layer stores values, never autograd history (`SinkWindowLayer._write`),
so an entry is a constant of later steps: the loss is exact; its gradient leaves out the path through a token's
own new entry back to the aligned entries of lower layers.

Every `eval_every` steps the validation text (never trained on) is streamed through `KV(C)` for each size and the
networks with the lowest mean loss are kept; the record holds the losses before, during and after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvforge.errors import KVForgeError
from kvforge.streaming.kvalign import KVAlign
from kvforge.streaming.modes import KV, streaming_cache


@dataclass
class TuneConfig:
    steps: int = 300  # optimiser steps (each = one token of every size's stream)
    rows: int = 8  # text rows per size's stream
    lr: float = 1e-4  # AdamW; the networks start from the K/V-error fit (or the identity)
    eval_every: int = 100  # steps between validations (and at the end)
    val_rows: int = 4  # validation rows per size
    val_tokens: int = 256  # validation predictions per row after the cache is full
    n_sink: int = 4
    seed: int = 0


class TrainStream:
    """One cache size's training stream: `rows` rows of the training ids `[T]` in a `KV(size)` cache with the
    networks at α = 1 and autograd on, moved to fresh random places of the text after 2·W steps past full."""

    def __init__(self, model: Any, nets: KVAlign, size: int, cfg: TuneConfig, ids: torch.Tensor,
                 gen: torch.Generator):
        self.model, self.nets, self.size, self.cfg, self.ids, self.gen = model, nets, size, cfg, ids, gen
        self.length = size + 2 * (size - cfg.n_sink) + 1  # tokens per row: fill, 2·W steps, their last target
        if len(ids) < self.length + 1:
            raise KVForgeError(f"the training text has {len(ids)} tokens; tuning cache {size} needs "
                               f"{self.length + 1}")
        self.x: torch.Tensor | None = None  # the rows streamed now (filled on the first step)
        self.t = 0  # the next token fed

    def restart(self, x: torch.Tensor | None = None) -> None:
        """Fill a fresh cache with the first `size` tokens of rows `x` `[rows, length]` (default: random places)."""
        if x is None:
            starts = torch.randint(0, len(self.ids) - self.length, (self.cfg.rows,), generator=self.gen)
            x = torch.stack([self.ids[s : s + self.length] for s in starts.tolist()])
        self.x = x.to(self.model.device)
        self.cache = streaming_cache(self.model, self.size, self.cfg.n_sink)
        for layer in self.cache.layers:
            layer.align = self.nets.correct  # α = 1, with autograd
        with torch.no_grad():  # the filling forward: nothing evicted, nothing to learn
            self.model(input_ids=self.x[:, : self.size], past_key_values=self.cache, use_cache=True)
        self.t = self.size

    def loss(self) -> torch.Tensor:
        """Cross-entropy of the next token after feeding one more token of every row (autograd on)."""
        if self.x is None or self.t >= self.x.shape[1] - 1:
            self.restart()
        logits = self.model(input_ids=self.x[:, self.t : self.t + 1], past_key_values=self.cache,
                            use_cache=True).logits[:, -1]
        self.t += 1
        return F.cross_entropy(logits.float(), self.x[:, self.t])


@torch.inference_mode()
def streamed_loss(model: Any, nets: KVAlign, ids: torch.Tensor, size: int, alpha: float, n_sink: int, rows: int,
                  tokens: int, cuda_graph: bool = False, what: str = "validating", hint: str = "") -> float:
    """Mean next-token loss of up to `rows` rows of `ids` `[T]` (each `size + tokens + 1` long; one row of what
    there is when the text is shorter) streamed through `KV(size, alpha=alpha)`, scored after the cache is full
    (α = 0 is `sw`)."""
    from kvforge.streaming.ppl import stream_nll

    need = min(size + tokens + 1, len(ids))
    if need < size + 2:
        raise KVForgeError(f"the validation text has {len(ids)} tokens; {what} cache {size} needs at least "
                           f"{size + 2}{hint}")
    x = ids[: min(rows, len(ids) // need) * need].view(-1, need)
    nll = stream_nll(model, x, KV(size, n_sink, nets=nets, alpha=alpha), cuda_graph=cuda_graph)
    return float(nll[:, size:].double().mean())


def validation_loss(model: Any, nets: KVAlign, ids: torch.Tensor, sizes: list[int], cfg: TuneConfig,
                    alpha: float = 1.0) -> dict[str, float]:
    """`streamed_loss` per cache size of `sizes` on `cfg.val_rows` rows of `cfg.val_tokens` predictions."""
    return {str(size): streamed_loss(model, nets, ids, size, alpha, cfg.n_sink, cfg.val_rows, cfg.val_tokens)
            for size in sizes}


def tune(model: Any, nets: KVAlign, train_ids: torch.Tensor, val_ids: torch.Tensor, sizes: list[int],
         cfg: TuneConfig | None = None, progress: bool = True) -> dict:
    """Train `nets` (in place) on the next-token loss of `train_ids` `[T]` streamed through `KV` at every size in
    `sizes`; keep the networks of lowest mean validation loss on `val_ids`. Returns the record."""
    from tqdm import tqdm

    cfg = cfg or TuneConfig()
    if cfg.steps < 1 or cfg.rows < 1:
        raise KVForgeError(f"tuning steps {cfg.steps} and rows {cfg.rows}; allowed: both ≥ 1")
    nets.check_model(model)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    params = list(nets.key_net.parameters()) + list(nets.value_net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        streams = [TrainStream(model, nets, size, cfg, train_ids, gen) for size in sizes]

        def validate() -> float:
            v = validation_loss(model, nets, val_ids, sizes, cfg)
            record["val"].append({"step": step, **v})
            return sum(v.values()) / len(v)

        record = {"config": asdict(cfg), "val_sw": validation_loss(model, nets, val_ids, sizes, cfg, 0.0),
                  "val": [], "train_loss": []}
        step = 0
        best = (validate(), nets.state(), 0)
        bar = tqdm(total=cfg.steps, desc="tune (next-token loss)", unit="step", disable=not progress)
        running = None
        while step < cfg.steps:
            opt.zero_grad()
            total = 0.0
            for s in streams:
                loss = s.loss() / len(streams)
                loss.backward()  # one stream's graph at a time: the next step writes into the buffers it read
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            running = total if running is None else 0.98 * running + 0.02 * total
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record["train_loss"].append({"step": step, "loss": running})
                v = validate()
                if progress:
                    bar.write(f"step {step}: validation loss {v:.4f} (best {best[0]:.4f}, sw "
                              f"{sum(record['val_sw'].values()) / len(sizes):.4f})")
                if v < best[0]:
                    best = (v, nets.state(), step)
        bar.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    nets.load_state(best[1])
    record["best_step"], record["steps"] = best[2], step
    return record

