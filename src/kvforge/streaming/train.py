"""Training KV-Align networks (`kvforge train kv-align`): the model generates its own pairs, then two small MLPs learn
to map one to the other.

A pair is (the window entry as the streaming cache holds it, the same entry recomputed from scratch): `streams`
rows of text are fed one token at a time through `SW(cache_size, n_sink)`, exactly as at inference; at `snapshots`
moments spread over the first 2·W evictions (the shifts of the filling transition and of the steady state) every
shifted entry is read (`SinkWindowLayer.raw`, pre-RoPE on rotary models) together with its shift, and the target is
the same position of a plain forward over the tokens the cache holds [sinks + window] at positions 0..n-1. So the
networks are trained on the shifts that occur at inference for every cache size they will serve. Pairs are saved
(DIR/pairs.pt) and reused by a re-run with the same settings.

Then (`lm_steps` > 0, the default) the networks train on the next-token loss of text streamed through `KV` mode,
backpropagated through the frozen model (`kvforge.streaming.tune`): the K/V error is a proxy that can disagree with
perplexity. Then, per cache size, the strength α of the correction (`kvalign` docstring) is chosen from `alphas` by the
next-token loss of validation text streamed through `KV` at that size (α = 0 is `sw`): the loss the networks are
for, not the MSE they are trained on. The table is recorded in kv_align.json (`trained.calibration`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from kvforge.errors import KVForgeError
from kvforge.rope import rope_for_layer, unapply
from kvforge.streaming.kvalign import KVAlign, model_identity
from kvforge.streaming.modes import SW, check_size
from kvforge.streaming.runner import Stream
from kvforge.streaming.tune import TuneConfig, streamed_loss, tune

PAIRS = ("xk", "xv", "yk", "yv", "shift", "layer", "head")
STORE = torch.float16  # pairs are kept (and saved) in half precision; batches are trained in fp32


@dataclass
class TrainConfig:
    """Defaults follow the reference (AdamW 7e-4, batch 512, 3 epochs) where it has one."""

    cache_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 1024])
    n_sink: int = 4
    streams: int = 16  # text rows streamed side by side per cache size
    snapshots: int = 24  # moments per cache size at which pairs are read
    per_snapshot: int = 8192  # pairs sampled per snapshot (over rows, layers, heads, entries)
    val_fraction: float = 0.1  # the end of the text, streamed apart, for validation
    epochs: int = 3
    batch_size: int = 512
    lr: float = 7e-4
    seed: int = 0
    num_pos: int = 1024
    key_hidden: list[int] = field(default_factory=lambda: [128, 128])
    value_hidden: list[int] = field(default_factory=lambda: [128, 128])
    cuda_graph: bool = False  # stream the pairs' text with one captured step per token (same pairs, faster)
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # strengths tried per size ([]: α = 1)
    calib_rows: int = 8  # validation rows streamed side by side per (size, α)
    calib_tokens: int = 1024  # predictions scored per row after the cache is full
    lm_steps: int = 300  # then steps on the next-token loss through the frozen model (kvforge.streaming.tune; 0: none)
    lm_rows: int = 8  # text rows per cache size in each of those steps
    lm_lr: float = 1e-4
    lm_eval_every: int = 100  # steps between validations of that stage (the best networks are kept)


@torch.inference_mode()
def recompute(model: Any, ids: torch.Tensor, ropes: list | None) -> tuple[list, list]:
    """Per layer, keys (pre-RoPE on rotary models) and values `[B, H, n, D]` of a plain forward over ids `[B, n]`
    at positions 0..n-1."""
    cache = DynamicCache()  # no config: every layer keeps all its entries (a sliding layer's mask still applies)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    pos = torch.arange(ids.shape[1], device=ids.device)
    keys = [layer.keys if ropes is None else unapply(layer.keys, pos, ropes[i]) for i, layer in enumerate(cache.layers)]
    return keys, [layer.values for layer in cache.layers]


@torch.inference_mode()
def make_pairs(model: Any, ids: torch.Tensor, cache_size: int, n_sink: int, snapshots: int, per_snapshot: int,
               generator: torch.Generator, progress=None, cuda_graph: bool = False) -> dict[str, torch.Tensor]:
    """Pairs from streaming the rows of `ids` `[B, T]` (T ≥ cache_size + 2·W) through `SW(cache_size, n_sink)`.
    Returns xk/xv (as the cache holds them), yk/yv (recomputed) `[N, D]` and shift/layer/head `[N]`, on CPU."""
    w = cache_size - n_sink
    when = sorted({cache_size + max(1, round((k + 1) * 2 * w / snapshots)) for k in range(snapshots)})
    if ids.shape[1] < when[-1]:
        raise KVForgeError(f"{ids.shape[1]} tokens per stream for cache {cache_size}; {when[-1]} needed")
    cfg = model.config.get_text_config()
    ropes = [rope_for_layer(cfg, i) for i in range(cfg.num_hidden_layers)] if getattr(
        cfg, "rope_parameters", None) else None
    stream, out = Stream(model, SW(cache_size, n_sink), cuda_graph=cuda_graph), {k: [] for k in PAIRS}
    stream.step(ids[:, :cache_size])  # the filling forward
    fed, layers = cache_size, len(stream.cache.layers)
    if progress:
        progress(cache_size)
    for t in when:
        for i in range(fed, t):
            stream.step(ids[:, i : i + 1])
        if progress:
            progress(t - fed)
        fed = t
        seq = torch.cat([ids[:, :n_sink], ids[:, t - w : t]], 1).to(model.device)  # what the cache holds
        yks, yvs = recompute(model, seq, ropes)
        for li, layer in enumerate(stream.cache.layers):
            xk, xv = layer.raw()
            first, last = n_sink, layer.n - 1  # the shifted entries
            b, h, m = xk.shape[0], xk.shape[1], last - first
            pick = torch.randint(0, b * h * m, (max(1, per_snapshot // layers),), generator=generator)
            bi, hi, ji = pick // (h * m), pick // m % h, pick % m
            at = (bi.to(xk.device), hi.to(xk.device), ji.to(xk.device))  # pick on the device, move only the picks
            for name, src in (("xk", xk), ("xv", xv), ("yk", yks[li]), ("yv", yvs[li])):
                out[name].append(src[:, :, first:last][at].to("cpu", STORE))
            out["shift"].append(layer.shifts()[first:last].cpu()[ji])
            out["layer"].append(torch.full_like(ji, li))
            out["head"].append(hi)
    return {k: torch.cat(v) for k, v in out.items()}


def pairs_for(model: Any, tokenizer: Any, text: str, cfg: TrainConfig, progress: bool = True
              ) -> tuple[dict, dict]:
    """(training pairs, validation pairs) for every cache size: training rows from the start of the text,
    validation rows from its last `val_fraction`."""
    from tqdm import tqdm

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    split = int(len(ids) * (1 - cfg.val_fraction))
    parts = {"train": (ids[:split], cfg.streams), "val": (ids[split:], max(1, cfg.streams // 4))}
    gen = torch.Generator().manual_seed(cfg.seed)
    total = sum(c + 2 * (c - cfg.n_sink) for c in cfg.cache_sizes) * 2
    bar = tqdm(total=total, desc="pairs", unit="step", disable=not progress)
    result = {}
    for name, (part, rows) in parts.items():
        chunks = []
        for size in cfg.cache_sizes:
            need = size + 2 * (size - cfg.n_sink)
            if len(part) < rows * need:  # fewer rows when the text is short
                rows = max(1, len(part) // need)
            if len(part) < need:
                raise KVForgeError(f"the {name} text has {len(part)} tokens; cache {size} needs {need} per stream")
            start = torch.randint(0, len(part) - rows * need + 1, (1,), generator=gen).item()
            rows_ids = part[start : start + rows * need].view(rows, need)
            chunks.append(make_pairs(model, rows_ids, size, cfg.n_sink, cfg.snapshots, cfg.per_snapshot, gen,
                                     progress=bar.update, cuda_graph=cfg.cuda_graph))
        result[name] = {k: torch.cat([c[k] for c in chunks]) for k in PAIRS}
    bar.close()
    return result["train"], result["val"]


def _loss(net, x, y, shift, layer, head) -> torch.Tensor:
    """MSE in the (layer, head)'s normalised units."""
    s = net.scale[layer, head][:, None]
    return (((net(x, shift, layer, head) - y) / s) ** 2).mean()


def _batch(pairs: dict, idx, dev) -> dict:
    if isinstance(idx, torch.Tensor):
        idx = idx.to(next(iter(pairs.values())).device)
    return {k: v[idx].to(dev, torch.float32 if v.is_floating_point() else None) for k, v in pairs.items()}


def _batches(n: int, size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i : i + size] for i in range(0, n, size)]


@torch.no_grad()
def evaluate(nets: KVAlign, pairs: dict, batch: int = 8192) -> float:
    """Mean validation loss of keys and values (normalised MSE)."""
    dev = nets.key_net.scale.device
    total, n = 0.0, len(pairs["shift"])
    for i in range(0, n, batch):
        p = _batch(pairs, slice(i, i + batch), dev)
        for net, x, y in ((nets.key_net, p["xk"], p["yk"]), (nets.value_net, p["xv"], p["yv"])):
            total += float(_loss(net, x, y, p["shift"], p["layer"], p["head"])) * len(p["shift"]) / 2
    return total / n


def set_scales(nets: KVAlign, pairs: dict) -> None:
    """Each (layer, head)'s RMS of the stored entries, for keys and values."""
    for net, x in ((nets.key_net, pairs["xk"].float()), (nets.value_net, pairs["xv"].float())):
        idx = pairs["layer"] * net.scale.shape[1] + pairs["head"]
        sq = torch.zeros(net.scale.numel()).index_add_(0, idx, x.pow(2).mean(-1))
        count = torch.zeros(net.scale.numel()).index_add_(0, idx, torch.ones(len(idx)))
        rms = (sq / count.clamp(min=1)).sqrt().clamp(min=1e-6)
        net.scale.copy_(torch.where(count > 0, rms, torch.ones_like(rms)).view_as(net.scale))


def fit(nets: KVAlign, train: dict, val: dict, cfg: TrainConfig, progress: bool = True, max_steps: int | None = None
        ) -> dict:
    """AdamW on both networks; validation after every epoch; the best networks (by validation loss) are kept.
    Returns the record: validation losses per epoch, the identity's loss, steps."""
    from tqdm import tqdm

    dev = nets.key_net.scale.device
    params = list(nets.key_net.parameters()) + list(nets.value_net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train["shift"])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if max_steps is None else min(max_steps, steps_per_epoch * cfg.epochs)
    # the pairs move to the device once (as stored, fp16): a step gathers its batch there (on a GPU, gathering on the
    # host and copying each batch, plus a sync per step for the progress bar, made training launch-bound)
    train, val = ({k: v.to(dev) for k, v in part.items()} for part in (train, val))
    record = {"val_identity": evaluate(nets, val), "val_loss": [], "steps": 0}
    best = (record["val_identity"], nets.state())
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress)
    for _ in range(cfg.epochs):
        for idx in _batches(n, cfg.batch_size, gen):
            if record["steps"] == total:
                break
            p = _batch(train, idx, dev)
            loss = _loss(nets.key_net, p["xk"], p["yk"], p["shift"], p["layer"], p["head"]) + _loss(
                nets.value_net, p["xv"], p["yv"], p["shift"], p["layer"], p["head"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            record["steps"] += 1
            bar.update(1)
            if record["steps"] % 50 == 1:  # reading the loss waits for the device: not every step
                bar.set_postfix(loss=f"{float(loss.detach()) / 2:.4g}")
        v = evaluate(nets, val)
        record["val_loss"].append(v)
        bar.write(f"validation loss {v:.4g} (identity {record['val_identity']:.4g})")
        if v < best[0]:
            best = (v, nets.state())
    bar.close()
    nets.load_state(best[1])
    return record


def calibrate(model: Any, nets: KVAlign, ids: torch.Tensor, cfg: TrainConfig, progress: bool = True) -> dict:
    """Per cache size, the α of `cfg.alphas` with the lowest next-token loss on rows of the validation ids `[T]`
    streamed through `KV(size, alpha=α)` (scored after the cache is full); sets `nets.spec.strength` and returns
    {size: {α: mean NLL}}. Ties keep the smaller α."""
    table = {}
    for size in cfg.cache_sizes:
        losses = {}
        for alpha in cfg.alphas:
            losses[alpha] = streamed_loss(model, nets, ids, size, alpha, cfg.n_sink, cfg.calib_rows, cfg.calib_tokens,
                                          cuda_graph=cfg.cuda_graph, what="calibrating",
                                          hint=" (or pass alphas [] / --alphas 1)")
            if progress:
                print(f"calibration: cache {size} α {alpha}: loss {losses[alpha]:.4f}", flush=True)
        nets.spec.strength[str(size)] = min(losses, key=lambda a: (losses[a], a))
        table[str(size)] = {str(a): v for a, v in losses.items()}
    return table


def train_kv_align(model: Any, tokenizer: Any, text: str, out: str | Path, cfg: TrainConfig | None = None,
                   meta: dict | None = None, progress: bool = True, max_steps: int | None = None) -> KVAlign:
    """Generate (or reuse) pairs, train, save DIR/kv_align.safetensors + DIR/kv_align.json. Returns the networks."""
    from kvforge.eval.runs import prepare_out

    cfg = cfg or TrainConfig()
    for size in cfg.cache_sizes:
        check_size(model, size, cfg.n_sink)
    out = prepare_out(out)
    key = {"model": model_identity(model), **{k: v for k, v in asdict(cfg).items() if k in (
        "cache_sizes", "n_sink", "streams", "snapshots", "per_snapshot", "val_fraction", "seed")},
        "text_chars": len(text)}
    cached = out / "pairs.pt"
    saved = torch.load(cached) if cached.exists() else None
    if saved is not None and saved["key"] == key:
        train, val = saved["train"], saved["val"]
    else:
        torch.manual_seed(cfg.seed)
        train, val = pairs_for(model, tokenizer, text, cfg, progress)
        torch.save({"key": key, "train": train, "val": val}, str(cached) + ".tmp")
        Path(str(cached) + ".tmp").replace(cached)
    torch.manual_seed(cfg.seed)
    nets = KVAlign.for_model(model, num_pos=cfg.num_pos, key_hidden=list(cfg.key_hidden),
                             value_hidden=list(cfg.value_hidden), n_sink=cfg.n_sink)
    set_scales(nets, train)
    nets.to(model.device)
    record = fit(nets, train, val, cfg, progress, max_steps)

    def save() -> None:  # the networks and the record so far: a stage stopped later keeps what finished before it
        nets.spec.trained = {**record, "pairs": len(train["shift"]), "val_pairs": len(val["shift"]),
                             "config": asdict(cfg), "meta": meta or {}}
        nets.save(out)

    save()  # (strength: none yet)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    split = int(len(ids) * (1 - cfg.val_fraction))
    if cfg.lm_steps:
        tcfg = TuneConfig(steps=cfg.lm_steps, rows=cfg.lm_rows, lr=cfg.lm_lr, eval_every=cfg.lm_eval_every,
                          n_sink=cfg.n_sink, seed=cfg.seed)
        record["lm"] = tune(model, nets, ids[:split], ids[split:], cfg.cache_sizes, tcfg, progress)
        save()
    if cfg.alphas:
        record["calibration"] = calibrate(model, nets, ids[split:], cfg, progress)
        record["strength"] = dict(nets.spec.strength)
    save()
    return nets
