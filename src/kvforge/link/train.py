"""Training link tokens (KVLink): one forward per batch over whole sequences with global positions and the segment
mask (documents see only themselves, everything else sees every earlier token), loss on answer tokens only. The
model is fully fine-tuned (the reference's recipe) or adapted with LoRA (rank r on every linear layer of the decoder,
plus the link tokens' embedding rows; the adapters are merged before saving, so the result is a plain model).

Output directory: the model and tokenizer (`save_pretrained`; `kvforge.load_model(DIR)` loads them, links included),
`train_log.json` (settings, data mix, loss per step, time) and `loss.png`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kvforge.errors import KVForgeError
from kvforge.eval.runs import device_name, git_commit, prepare_out, versions
from kvforge.link.assemble import layer_masks, segment_mask
from kvforge.link.data import collate, training_sample, training_sequence
from kvforge.link.tokens import CONFIG_KEY, Links, add_links, load_links
from kvforge.prompt import use_template


@dataclass
class TrainConfig:
    """Settings of `kvforge train kvlink` (see `add_parsers` in `kvforge.link.cli` for their meaning)."""

    steps: int = 300
    batch: int = 8
    lr: float = 2e-5
    warmup: int = 10
    n_links: int = 5
    max_docs: int = 10
    text_fraction: float = 0.2
    two_hop_fraction: float = 0.3
    causal_fraction: float = 0.0  # samples trained as ordinary causal sequences, no links (the reference: 60%)
    lora: int = 0  # LoRA rank; 0 = full fine-tune
    link_lr: float | None = None  # the link rows' own learning rate; the other embedding rows then stay frozen
    lora_alpha: float = 16.0
    seed: int = 0
    template: bool | None = None  # default: the tokenizer's chat template when it has one


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) · x Aᵀ Bᵀ` with the base frozen; B starts at zero, so training starts from the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        fan_in = base.in_features
        self.a = nn.Parameter(torch.randn(rank, fan_in, device=base.weight.device) / math.sqrt(fan_in))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.to(x.dtype).T @ self.b.to(x.dtype).T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.scale * self.b @ self.a).to(self.base.weight.dtype)
        return self.base.requires_grad_(True)


def _swap_linears(model, make) -> None:
    """Replace every linear layer inside the decoder's layers by `make(linear)`."""
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}." or isinstance(module, LoRALinear):
            continue
        for child, sub in list(module.named_children()):
            if type(sub) is nn.Linear or isinstance(sub, LoRALinear):
                setattr(module, child, make(sub))


def _link_rows(model, links: Links, cfg: TrainConfig) -> dict:
    """The optimizer group of the input embeddings in which only the link tokens' rows learn (at `link_lr` if set)."""
    emb = model.get_input_embeddings().weight
    rows = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
    rows[list(links.ids)] = 1
    emb.requires_grad_(True)
    emb.register_hook(lambda g: g * rows)
    return {"params": [emb], "weight_decay": 0.0, **({"lr": cfg.link_lr} if cfg.link_lr else {})}


def trainable_parameters(model, links: Links, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: everything (full fine-tune, the reference's recipe), or LoRA adapters + the link rows of the
    input embeddings. With `link_lr`, a full fine-tune trains the decoder at `lr` and the link rows at `link_lr`,
    the other embedding rows (and a tied output head) frozen: Adam's step does not scale with the gradient, so a
    row's learning rate can only differ through a group of its own, and new rows at the model's small `lr` barely
    move from their initialisation (measured: docs/link.md)."""
    if not cfg.lora:
        model.requires_grad_(True)
        if not cfg.link_lr:
            return [{"params": [p for p in model.parameters() if p.requires_grad]}]
        emb = model.get_input_embeddings().weight
        return [{"params": [p for p in model.parameters() if p is not emb]}, _link_rows(model, links, cfg)]
    model.requires_grad_(False)
    _swap_linears(model, lambda lin: LoRALinear(lin, cfg.lora, cfg.lora_alpha))
    adapters = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.a, m.b)]
    return [{"params": adapters}, _link_rows(model, links, cfg)]


def batch_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of a collated batch, from one segment-masked forward."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    t = batch["input_ids"].shape[1]
    pos = torch.arange(t, device=device)
    mask = layer_masks(model, pos, pos, segment_mask(batch["segments"], batch["valid"]))
    predicted = (batch["labels"][:, 1:] != -100).any(0).nonzero()[:, 0]  # positions whose next token is an answer
    out = model(input_ids=batch["input_ids"], position_ids=pos[None], attention_mask=mask, use_cache=False,
                logits_to_keep=predicted)
    targets = batch["labels"][:, predicted + 1]
    return nn.functional.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def train_kvlink(model, tokenizer, out, cfg: TrainConfig, progress: bool = True, meta: dict | None = None) -> dict:
    """Add link tokens to `model`/`tokenizer` (or continue with the ones it has), train them, save to `out`.
    Returns the training log (also written to `out/train_log.json`)."""
    if not 0 <= cfg.causal_fraction <= 1:
        raise KVForgeError(f"causal_fraction={cfg.causal_fraction}; allowed: a share in [0, 1]")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.max_docs < 2:
        raise KVForgeError(f"steps={cfg.steps}, batch={cfg.batch}, max_docs={cfg.max_docs}; allowed: steps ≥ 1, "
                           "batch ≥ 1, max_docs ≥ 2")
    out = prepare_out(out)
    links = (load_links(model, tokenizer) if getattr(model.config, CONFIG_KEY, None)
             else add_links(model, tokenizer, cfg.n_links, cfg.max_docs))
    template = use_template(tokenizer, cfg.template)
    groups = trainable_parameters(model, links, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * max(0.0, 1 - s / cfg.steps))
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses, kinds, start = [], {}, time.time()
    model.train()
    bar = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="train kvlink", unit="step")
    for step in bar:
        rng = random.Random(f"kvlink-train:{cfg.seed}:{step}")
        samples = [training_sample(rng, min(cfg.max_docs, links.max_docs), cfg.text_fraction, cfg.two_hop_fraction)
                   for _ in range(cfg.batch)]
        # drawn only when asked for, so that runs without causal samples keep their sample stream
        causal = [cfg.causal_fraction > 0 and rng.random() < cfg.causal_fraction for _ in samples]
        for s, c in zip(samples, causal):
            kind = f"causal_{s.kind}" if c else s.kind
            kinds[kind] = kinds.get(kind, 0) + 1
        batch = collate([training_sequence(tokenizer, s, links, template, c) for s, c in zip(samples, causal)], pad)
        with autocast:
            loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if cfg.lora:
        _swap_linears(model, lambda lin: lin.merged() if isinstance(lin, LoRALinear) else lin)
    model.eval()
    model.requires_grad_(False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {"config": asdict(cfg), "template": template, "links": {"n_links": links.n_links, "max_docs": links.max_docs},
           "samples": kinds, "loss": losses, "seconds": round(time.time() - start, 1), "commit": git_commit(),
           "device": device_name(model), "versions": versions(), **(meta or {})}
    (Path(out) / "train_log.json").write_text(json.dumps(log, indent=1))
    _plot_loss(losses, Path(out) / "loss.png")
    return log


def _plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label="batch")
    if len(losses) >= 10:
        k = max(len(losses) // 20, 5)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
