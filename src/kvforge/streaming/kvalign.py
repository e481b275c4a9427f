"""KV-Align networks: small residual MLPs that rewrite the window entries of a sink + window cache after evictions.

Reference: https://github.com/eecs585projectorg/kv-align (key and value networks shared across layers and heads,
on 64-dim head vectors; input = vector + position embedding (256×32) + layer embedding (L×4) + head embedding (H×8);
DistilGPT2 key 108→256→64→64, value 108→64→128→64; SmolLM2 108→128→128→64; MSE, AdamW).

What differs here, and why (docs/streaming.md):
- The networks read the entry *as stored* plus its shift (how far it moved since it was computed, = the number of
  evicted tokens it had attended to), never their own earlier output: the reference rewrites the cache in place
  at every eviction, so an entry of a cache of C is rewritten ~C times and errors compound (its perplexity collapses
  at 255). Here one application per read maps raw → aligned, whatever the cache size.
- The position embedding is indexed by that shift (`num_pos`, default 1024, sizes configurable); head_dim is the
  model's; on rotary models keys are aligned pre-RoPE (positions are exact already, by re-rotation).
- Each (layer, head) is normalised by the RMS of its training inputs, and the last layer starts at zero, so an
  untrained network is the identity (`kv` = `sw`).
- A strength α per cache size scales the correction (x + α·s·MLP): training picks it from {0, ½, 1} by next-token
  loss on validation text streamed at that size (`AlignSpec.strength`), so at a size where the networks do not help
  on validation text `kv` falls back towards `sw` instead of making it worse. Sizes not calibrated use the nearest
  calibrated size's α (1 when none is).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvforge.config import text_config
from kvforge.errors import KVForgeError

WEIGHTS, CONFIG = "kv_align.safetensors", "kv_align.json"


def model_identity(model: Any) -> dict:
    """What identifies the model a set of networks was made for: its shapes and a few embedding weights."""
    cfg = text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    emb = model.get_input_embeddings().weight
    return {
        "name": str(getattr(cfg, "name_or_path", "") or cfg.model_type),
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "fingerprint": emb[:4, :4].detach().float().flatten().tolist(),
    }


@dataclass
class AlignSpec:
    """Sizes of the two networks and the identity of the model they belong to."""

    model: dict
    num_pos: int = 1024
    pos_dim: int = 32
    layer_dim: int = 4
    head_emb_dim: int = 8
    key_hidden: list[int] = field(default_factory=lambda: [128, 128])
    value_hidden: list[int] = field(default_factory=lambda: [128, 128])
    n_sink: int = 4
    trained: dict = field(default_factory=dict)  # what training recorded (cache sizes, steps, losses)
    strength: dict = field(default_factory=dict)  # cache size (str) -> α chosen on validation text

    def strength_for(self, cache_size: int) -> float:
        """α for a cache of `cache_size` entries: its own, else the nearest calibrated size's, else 1."""
        if not self.strength:
            return 1.0
        nearest = min(self.strength, key=lambda k: (abs(int(k) - cache_size), int(k)))
        return float(self.strength[nearest])


class AlignNet(nn.Module):
    """x `[N, D]` + embeddings of shift, layer and head → x + s·MLP(...), s the RMS of the (layer, head)."""

    def __init__(self, dim: int, hidden: list[int], spec: AlignSpec):
        super().__init__()
        layers, heads = spec.model["num_layers"], spec.model["num_kv_heads"]
        self.num_pos = spec.num_pos
        self.pos = nn.Embedding(spec.num_pos, spec.pos_dim)
        self.layer = nn.Embedding(layers, spec.layer_dim)
        self.head = nn.Embedding(heads, spec.head_emb_dim)
        sizes = [dim + spec.pos_dim + spec.layer_dim + spec.head_emb_dim, *hidden, dim]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        nn.init.zeros_(self.fcs[-1].weight)
        nn.init.zeros_(self.fcs[-1].bias)
        self.register_buffer("scale", torch.ones(layers, heads))

    def forward(self, x: torch.Tensor, shift: torch.Tensor, layer: torch.Tensor, head: torch.Tensor,
                alpha: float = 1.0) -> torch.Tensor:
        s = self.scale[layer, head][:, None]
        z = torch.cat([x / s, self.pos(shift.clamp(max=self.num_pos - 1)), self.layer(layer), self.head(head)], -1)
        for fc in self.fcs[:-1]:
            z = torch.relu(fc(z))
        return x + (alpha * s) * self.fcs[-1](z)  # α scales the correction only, never the normalised input


class KVAlign:
    """A key network and a value network for one model. `apply` is what a `SinkWindowLayer` calls."""

    def __init__(self, spec: AlignSpec, key_dim: int | None = None, value_dim: int | None = None):
        self.spec = spec
        self.key_net = AlignNet(key_dim or spec.model["head_dim"], spec.key_hidden, spec)
        self.value_net = AlignNet(value_dim or spec.model["head_dim"], spec.value_hidden, spec)

    @classmethod
    def for_model(cls, model: Any, **sizes) -> KVAlign:
        """Untrained (identity) networks for `model`; `sizes`: any AlignSpec field (num_pos, key_hidden, ...)."""
        return cls(AlignSpec(model_identity(model), **sizes))

    def to(self, device=None) -> KVAlign:
        self.key_net.to(device)
        self.value_net.to(device)
        return self

    def state(self) -> tuple[dict, dict]:
        """A copy of both networks' weights (training keeps its best networks this way)."""
        return ({k: v.detach().clone() for k, v in self.key_net.state_dict().items()},
                {k: v.detach().clone() for k, v in self.value_net.state_dict().items()})

    def load_state(self, state: tuple[dict, dict]) -> None:
        self.key_net.load_state_dict(state[0])
        self.value_net.load_state_dict(state[1])

    def check_model(self, model: Any) -> None:
        """One-line KVForgeError unless these networks were made for `model`."""
        mine, theirs = self.spec.model, model_identity(model)
        fields = ("model_type", "num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")
        same = all(mine[f] == theirs[f] for f in fields) and torch.allclose(
            torch.tensor(mine["fingerprint"]), torch.tensor(theirs["fingerprint"]), rtol=2e-2, atol=1e-4)
        if not same:
            raise KVForgeError(f"KV-Align networks made for {mine['name']!r} ({mine['model_type']}, "
                               f"{mine['num_layers']} layers) do not fit model {theirs['name']!r} "
                               f"({theirs['model_type']}, {theirs['num_layers']} layers); train them for this model "
                               "with `kvforge train kv-align`")

    def aligner(self, cache_size: int, alpha: float | None = None):
        """What a `SinkWindowLayer` of `cache_size` entries calls: `apply` at that size's strength (`alpha` overrides
        it); None at α = 0 (the entries stay as stored: `sw`)."""
        alpha = self.spec.strength_for(cache_size) if alpha is None else alpha
        if alpha == 0:
            return None
        if alpha == 1:
            return self.apply
        return lambda layer_idx, keys, values, shifts: self.apply(layer_idx, keys, values, shifts, alpha=alpha)

    @torch.no_grad()
    def apply(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, shifts: torch.Tensor,
              alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned keys `[B, H, m, Dk]` and values `[B, H, m, Dv]` of m window entries with shifts `[m]`; `alpha`
        scales the correction. No autograd graph (`correct` is the same with one)."""
        return self.correct(layer_idx, keys, values, shifts, alpha)

    def correct(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, shifts: torch.Tensor,
                alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """`apply`, differentiable in the networks' weights (what training through the frozen model calls)."""
        b, h, m, _ = keys.shape
        dev = keys.device
        shift = shifts.to(dev).expand(b, h, m).reshape(-1)
        head = torch.arange(h, device=dev)[None, :, None].expand(b, h, m).reshape(-1)
        layer = torch.full_like(head, layer_idx)
        net_dtype = self.key_net.scale.dtype
        k = self.key_net(keys.reshape(-1, keys.shape[-1]).to(net_dtype), shift, layer, head, alpha)
        v = self.value_net(values.reshape(-1, values.shape[-1]).to(net_dtype), shift, layer, head, alpha)
        return k.view(keys.shape).to(keys.dtype), v.view(values.shape).to(values.dtype)

    # -- files ----------------------------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        """DIR/kv_align.safetensors (both networks) and DIR/kv_align.json (sizes, model identity, training record)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"key.{k}": v.detach().cpu().contiguous() for k, v in self.key_net.state_dict().items()}
        tensors |= {f"value.{k}": v.detach().cpu().contiguous() for k, v in self.value_net.state_dict().items()}
        tmp = out / (WEIGHTS + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(out / WEIGHTS)
        meta = out / (CONFIG + ".tmp")
        meta.write_text(json.dumps(asdict(self.spec), indent=1))
        meta.replace(out / CONFIG)
        return out

    @classmethod
    def load(cls, path: str | Path, device=None) -> KVAlign:
        """Networks saved by `save` (a directory); one-line KVForgeError when it holds none."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise KVForgeError(f"no KV-Align networks in {str(path)!r} (expected {CONFIG} and {WEIGHTS}); train them "
                               "with `kvforge train kv-align --out DIR`")
        spec = AlignSpec(**json.loads((path / CONFIG).read_text()))
        tensors = load_file(str(path / WEIGHTS))
        key = {k[4:]: v for k, v in tensors.items() if k.startswith("key.")}
        value = {k[6:]: v for k, v in tensors.items() if k.startswith("value.")}
        nets = cls(spec, _out_dim(key), _out_dim(value))
        nets.key_net.load_state_dict(key)
        nets.value_net.load_state_dict(value)
        return nets.to(device)


def _out_dim(state: dict) -> int:
    last = max(int(k.split(".")[1]) for k in state if k.startswith("fcs."))
    return state[f"fcs.{last}.weight"].shape[0]
