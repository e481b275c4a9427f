"""Loading a model for streaming: everything `kvforge.models.load_model` loads, plus local absolute-position
models (a GPT-2 directory from `kvforge train gpt2`), which the presses do not support but streaming does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ABSOLUTE = ("gpt2",)  # model types whose positions are learned embeddings added to the input


def load_stream_model(name: str, dtype: str | None = None, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode. A local directory of an absolute-position model loads with transformers'
    SDPA attention; anything else goes through `kvforge.models.load_model`."""
    from kvforge.models import load_model, resolve_device, resolve_dtype

    cfg = Path(name) / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") in ABSOLUTE:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=resolve_dtype(dtype, device), device_map=device,
                                                     local_files_only=True, attn_implementation="sdpa")
        return model.eval(), AutoTokenizer.from_pretrained(name, local_files_only=True)
    return load_model(name, dtype=dtype, device=device)
