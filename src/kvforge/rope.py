"""Rotary position embeddings (RoPE) of the supported families, as transformers computes them.

RoPE turns each channel pair (x_i, x_{i + r/2}), i < r/2, of the first r = `rotary_dim` channels of a query or
key at position p by the angle p·θ_i (θ = `inv_freq`; the "rotate-half" layout):

    R(p)·x = x·cos(pθ) + rotate_half(x)·sin(pθ),    rotate_half([x1, x2]) = [−x2, x1],

and transformers folds a constant `attention_scaling` s into cos/sin, so a cached key is s·R(p)·k. Channels
≥ r (partial rotary) are never rotated. Rotations compose, R(p + Δ) = R(Δ)·R(p), so a cached key moves to
position p + Δ by the pure rotation R(Δ) (no second factor s): see :func:`rotate`. :func:`apply` and
:func:`unapply` go between pre-RoPE vectors and what the model caches (s·R(p)·x and back).

Cohere, GLM, ERNIE 4.5 and Helium pair the channels the other way, (x_{2i}, x_{2i+1}) (the "interleaved" layout,
`Rope.interleaved`): the same rotations on other pairs. :func:`pairs` and :func:`join` hide the layout from the
arithmetic.

A NoPE layer (SmolLM3's and Llama 4's `no_rope_layers` entries 0; Cohere 2's and EXAONE 4's global layers) has
`rotary_dim` 0, and every function here returns its input unchanged for it.

The frequencies come from transformers itself (``ROPE_INIT_FUNCTIONS``) for every scaled RoPE type, and from
the families' shared default formula θ_i = base^(−2i/r) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvforge.config import text_config
from kvforge.errors import KVForgeError

STATIC_TYPES = ("default", "linear", "llama3", "yarn", "proportional")  # frequencies fixed by the config
SEQ_LEN_TYPES = ("dynamic", "longrope")  # frequencies that depend on the sequence length (see rope_for_layer)
# model types rotating channel pairs (2i, 2i + 1)
INTERLEAVED = frozenset({"cohere", "cohere2", "glm", "glm4", "ernie4_5", "helium"})


@dataclass(frozen=True, eq=False)
class Rope:
    """The RoPE of one layer. `inv_freq [rotary_dim/2]` fp32 (θ_i, radians per position); `attention_scaling`:
    the factor transformers multiplies cos/sin by; `rotary_dim` ≤ `head_dim`: the leading channels rotated (0: a
    NoPE layer); `interleaved`: pairs (2i, 2i + 1) instead of (i, i + r/2)."""

    inv_freq: torch.Tensor
    attention_scaling: float
    rotary_dim: int
    head_dim: int
    rope_type: str
    interleaved: bool = False


def pairs(x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Views `(x1, x2)` `[..., r/2]` of the two halves of each rotated channel pair of `x` `[..., head_dim]`."""
    r = rope.rotary_dim
    if rope.interleaved:
        both = x[..., :r].unflatten(-1, (r // 2, 2))
        return both[..., 0], both[..., 1]
    return x[..., : r // 2], x[..., r // 2 : r]


def join(y1: torch.Tensor, y2: torch.Tensor, rest: torch.Tensor, rope: Rope) -> torch.Tensor:
    """The inverse of :func:`pairs`: pair halves `[..., r/2]` and the unrotated channels back to `[..., head_dim]`."""
    if rope.interleaved:
        return torch.cat([torch.stack([y1, y2], -1).flatten(-2), rest], -1)
    return torch.cat([y1, y2, rest], -1)


def is_nope(config, layer_idx: int) -> bool:
    """True for a layer without RoPE: `config.no_rope_layers[layer_idx] == 0` (SmolLM3, Llama 4; 1 = RoPE), a global
    layer of Cohere 2 (only its sliding layers rotate), or a global layer of EXAONE 4 when it has sliding layers."""
    config = text_config(config)
    nope = getattr(config, "no_rope_layers", None)
    if nope is not None and not nope[layer_idx]:
        return True
    types = getattr(config, "layer_types", None)
    kind = types[layer_idx] if types else None
    model_type = getattr(config, "model_type", None)
    if model_type == "cohere2":
        return kind == "full_attention"
    hybrid = getattr(config, "sliding_window", None) is not None
    return model_type == "exaone4" and hybrid and kind != "sliding_attention"


def rope_for_layer(config, layer_idx: int, seq_len: int | None = None, device=None) -> Rope:
    """The RoPE of layer `layer_idx` of `config` (a model config; multimodal configs use their text config).

    Per-layer-type RoPE (Gemma3: sliding and full layers with their own base and scaling) follows
    `config.layer_types`. `seq_len` matters only for the sequence-length-dependent types, and is
    the length transformers computed the frequencies for:
    - ``dynamic`` (NTK): the frequencies grow with the largest `max(position_ids) + 1` the model has seen
      while that exceeds `max_position_embeddings`; None (default) gives the frequencies used while every
      position stays below it. Past that length each forward that grows the sequence rotates its new
      keys with other frequencies, so one `Rope` describes all cached keys only below it.
    - ``longrope``: the short factors while `seq_len` ≤ `original_max_position_embeddings` (None), the
      long factors above.
    `device`: where `inv_freq` is built (the functions below move it to their input's device anyway).

    A NoPE layer (:func:`is_nope`) gets a `Rope` with `rotary_dim` 0: every function below returns its input
    unchanged for it.
    """
    config = text_config(config)
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise KVForgeError(f"rope: config {type(config).__name__} has no rope_parameters; allowed: a RoPE model")
    layer_types = getattr(config, "layer_types", None)
    n = len(layer_types) if layer_types else getattr(config, "num_hidden_layers", None)
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < (n or 0):
        raise KVForgeError(f"rope: layer_idx={layer_idx!r}; allowed: 0 ≤ layer_idx < {n}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    interleaved = getattr(config, "model_type", None) in INTERLEAVED
    if is_nope(config, layer_idx):
        return Rope(torch.zeros(0, device=device), 1.0, 0, head_dim, "none", interleaved)
    layer_type = layer_types[layer_idx] if layer_types else None
    if layer_type in params:  # nested per layer type
        params = params[layer_type]
    else:
        layer_type = None
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise KVForgeError(f"rope: layer {layer_idx} has no RoPE parameters ({params!r}); allowed: a RoPE layer")
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        scaling = 1.0
    elif rope_type in STATIC_TYPES + SEQ_LEN_TYPES:
        kwargs = {"layer_type": layer_type} if layer_type else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=seq_len, **kwargs)
    else:
        raise KVForgeError(f"rope: rope_type {rope_type!r} is not supported; allowed: "
                           f"{', '.join(STATIC_TYPES + SEQ_LEN_TYPES)}")
    inv_freq = inv_freq.float()
    return Rope(inv_freq, float(scaling), 2 * inv_freq.numel(), head_dim, rope_type, interleaved)


def layer_rope(config, layer_idx: int) -> Rope | None:
    """The RoPE of layer `layer_idx`, or None when it has none: a model without `rope_parameters` (absolute
    positions) or a NoPE layer. For callers that skip RoPE arithmetic altogether where there is none."""
    if not getattr(text_config(config), "rope_parameters", None):
        return None
    rope = rope_for_layer(config, layer_idx)
    return rope if rope.rotary_dim else None


def _turn(x: torch.Tensor, steps, rope: Rope, scale: float, name: str, what: str) -> torch.Tensor:
    """s·R(steps)·x on the first rotary_dim channels of x `[..., D]`, in fp32, returned in x's dtype."""
    if x.shape[-1] != rope.head_dim:
        raise KVForgeError(f"rope.{name}: last dim {x.shape[-1]} of x {tuple(x.shape)}; allowed: head_dim "
                           f"{rope.head_dim}")
    steps = torch.as_tensor(steps, dtype=torch.float32, device=x.device)
    lead = tuple(x.shape[:-1])
    try:
        ok = torch.broadcast_shapes(steps.shape, lead) == lead
    except RuntimeError:
        ok = False
    if not ok:
        raise KVForgeError(f"rope.{name}: {what} of shape {tuple(steps.shape)} does not broadcast to x's {lead}; "
                           f"allowed: a number, a 0-d tensor or a tensor broadcastable to {lead}")
    if rope.rotary_dim == 0:  # a NoPE layer
        return x
    angle = steps[..., None] * rope.inv_freq.to(x.device)  # [..., r/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = (t.float() for t in pairs(x, rope))
    y1, y2 = (x1 * cos - x2 * sin) * scale, (x2 * cos + x1 * sin) * scale
    return join(y1.to(x.dtype), y2.to(x.dtype), x[..., rope.rotary_dim :], rope)


def rotate(keys: torch.Tensor, delta, rope: Rope) -> torch.Tensor:
    """Cached (already rotated) keys `[B, H, T, D]` moved by `delta` positions: R(Δ)·keys, exactly what the
    model would have cached at position p + Δ. `delta`: a number, a 0-d tensor, or a tensor broadcastable to
    `[B, H, T]` (one Δ per entry, e.g. `[T]` or `[B, 1, T]`). No attention_scaling (it is already in the keys);
    channels beyond `rope.rotary_dim` are returned unchanged."""
    return _turn(keys, delta, rope, 1.0, "rotate", "delta")


def rotate_(keys: torch.Tensor, delta: torch.Tensor, rope: Rope) -> None:
    """`keys[:] = rotate(keys, delta, rope)`, in place and bitwise the same, for keys `[..., N, D]` and `delta [N]`
    (the fast path of KVLink's placement; `rotate` is its obviously-correct twin, compared bit for bit in
    tests/test_link_overhead.py):
    4 large kernels instead of `rotate`'s 13 and under half its memory traffic (no fp32 copies of the keys, no
    multiplication by a scale of 1, no concatenation). The products are taken in fp32 straight from the keys' dtype
    (widening is exact), `x1·cos − x2·sin` is computed as `x1·cos + x2·(−sin)` (IEEE: a − b is a + (−b), and negating
    a factor negates the rounded product), and each sum is rounded once into the keys' dtype, as `.to()` does."""
    half, r = rope.rotary_dim // 2, rope.rotary_dim
    if r == 0:  # a NoPE layer
        return
    angle = delta.to(torch.float32)[:, None] * rope.inv_freq.to(keys.device)  # [N, r/2], as rope.rotate
    cos, sin = angle.cos(), angle.sin()
    # the pair axis k (0: x1, 1: x2) of [G, H, N, 2, r/2] (rotate-half) or [G, H, N, r/2, 2] (interleaved)
    k = -1 if rope.interleaved else -2
    x = keys[..., :r].unflatten(-1, (half, 2) if rope.interleaved else (2, half))
    p = x * cos.unsqueeze(k)  # (x1·cos, x2·cos), fp32
    q = x * torch.stack([sin, -sin], k)  # (x1·sin, −x2·sin), fp32
    out1, out2 = x.unbind(k)  # views of the keys
    torch.add(p.select(k, 0), q.select(k, 1), out=out1)  # x1·cos − x2·sin
    torch.add(p.select(k, 1), q.select(k, 0), out=out2)  # x2·cos + x1·sin


def apply(x: torch.Tensor, positions, rope: Rope) -> torch.Tensor:
    """Pre-RoPE vectors `[B, H, T, D]` rotated to `positions` (broadcastable to `[B, H, T]`) as the model does
    it: s·R(p)·x, with s = `rope.attention_scaling`."""
    return _turn(x, positions, rope, rope.attention_scaling, "apply", "positions")


def unapply(x: torch.Tensor, positions, rope: Rope) -> torch.Tensor:
    """The inverse of :func:`apply`: cached keys `[B, H, T, D]` at `positions` back to pre-RoPE, R(−p)·x / s."""
    return _turn(x, -torch.as_tensor(positions), rope, 1.0 / rope.attention_scaling, "unapply", "positions")
