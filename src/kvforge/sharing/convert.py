"""Conversion of a pretrained Llama-family model into a KV-sharing model (the reference's `convert_pretrained.py`):
every weight is copied, and each producing layer's k/v projections become the mean of the projections of the layers
that read it (heads are averaged index by index, as in the reference)."""

from __future__ import annotations

import torch

from kvforge.errors import KVForgeError
from kvforge.sharing.configuration import KVSharingConfig
from kvforge.sharing.layer_map import LayerMap
from kvforge.sharing.modeling import KVSharingForCausalLM

# config.json bookkeeping that must not be copied into the new config
_DROP = ("model_type", "architectures", "transformers_version", "quantization_config", "_name_or_path",
         "kv_layers", "auto_map")


def sharing_config(cfg, layer_map: LayerMap | str, **config: object) -> KVSharingConfig:
    """The `KVSharingConfig` of a Llama-architecture config `cfg` with `layer_map`: every field of `cfg` kept (its
    shapes, RoPE, vocabulary), `config` setting others (sliding_window, forward_passes, backward_passes)."""
    lm = LayerMap.parse(str(layer_map), cfg.num_hidden_layers)
    fields = {k: v for k, v in cfg.to_dict().items() if k not in _DROP}
    return KVSharingConfig(**(fields | config), kv_layers=str(lm))


def convert(model, layer_map: LayerMap | str, **config: object) -> KVSharingForCausalLM:
    """A `KVSharingForCausalLM` with `model`'s weights (a Llama-architecture causal LM, e.g. SmolLM2) and
    `layer_map` (a LayerMap or its string); `config` sets other KVSharingConfig fields (sliding_window,
    forward_passes, backward_passes). Same dtype and device as `model`, eval mode."""
    cfg = model.config
    if cfg.model_type != "llama":
        raise KVForgeError(f"cross-layer sharing converts Llama-architecture models (model_type 'llama'); got "
                           f"{cfg.model_type!r}")
    lm = LayerMap.parse(str(layer_map), cfg.num_hidden_layers)
    new_cfg = sharing_config(cfg, lm, **config)
    param = next(model.parameters())
    with torch.device(param.device):
        new = KVSharingForCausalLM(new_cfg).to(param.dtype)
    source = model.state_dict()
    state = {}
    for name in new.state_dict():
        if ".k_proj." in name or ".v_proj." in name:
            layer, rest = name.split(".self_attn.")
            j = int(layer.rsplit(".", 1)[1])
            state[name] = torch.stack([source[f"model.layers.{i}.self_attn.{rest}"]
                                       for i in lm.consumers(j)]).mean(0)
        else:
            state[name] = source[name]
    new.load_state_dict(state)
    new.generation_config = model.generation_config
    return new.eval()


def preset_maps(names: list[str], cfg, warmup: int = 2) -> dict[str, str]:
    """Preset name -> layer-map string for a Llama-architecture config `cfg` (one-line errors: another
    architecture, an unknown preset, a preset that does not fit the layer count)."""
    from kvforge.sharing.layer_map import PRESETS, preset

    if cfg.model_type != "llama":
        raise KVForgeError(f"cross-layer sharing needs a Llama-architecture model (model_type 'llama'); got "
                           f"{cfg.model_type!r}")
    for name in names:
        if name not in PRESETS:
            raise KVForgeError(f"sharing preset {name!r}; allowed: {', '.join(PRESETS)}")
    return {name: str(preset(name, cfg.num_hidden_layers, warmup=warmup)) for name in names}


def random_sharing_model(dense, layer_map: LayerMap | str) -> KVSharingForCausalLM:
    """A sharing model with `dense`'s config (shapes, RoPE, vocabulary), `layer_map`, i.i.d. random weights, on
    `dense`'s device and dtype — for speed and memory measurements, which do not depend on the weights."""
    from kvforge.models import random_model_from_config

    return random_model_from_config(sharing_config(dense.config, layer_map), dense.dtype, str(dense.device))
