"""What kvforge reads from a model's config: the supported families, the text config, the kind of each layer,
and switching a model to the kvforge attention implementation.

The bottom of the package's import layering (see docs/architecture.md): it imports nothing of kvforge but
`errors`, so every other module may use it.
"""

from __future__ import annotations

from typing import Any

from kvforge.errors import KVForgeError

# The package's version (kvforge.__version__; pyproject.toml's `version`, kept equal by tests/test_eval_runs.py).
# Here, at the bottom of the layering, so run metadata can record it without importing the package root.
VERSION = "0.1.0"

# The name the attention function is registered under (with transformers' AttentionInterface and
# AttentionMaskInterface, when `kvforge` is imported).
ATTENTION = "kvforge"

SUPPORTED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "phi3",
    # checked 2026-12-07 with the same family tests (tests/helpers.py FAMILIES)
    "olmo2", "olmo3", "granite", "granitemoe", "mixtral", "qwen3_moe", "starcoder2", "gpt_neox", "phi", "stablelm",
    "smollm3", "cohere", "cohere2", "glm", "glm4", "gemma2", "gpt_oss", "arcee", "apertus", "seed_oss",
    "hunyuan_v1_dense", "ministral", "ernie4_5", "helium", "exaone4",
    "kvforge_kv_sharing",  # kvforge.sharing's model
})


def text_config(model_or_config: Any) -> Any:
    """The text part of a model's config (a multimodal config's `text_config`, else the config itself)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config


def check_supported(model_or_config: Any) -> None:
    """Raise KVForgeError unless the model (or config) has a model_type kvforge supports."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KVForgeError(
            f"unsupported model architecture {model_type!r}; "
            f"kvforge supports model_type: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )


def layer_types(model_or_config: Any) -> list[str]:
    """`full_attention` / `sliding_attention` / `chunked_attention` per layer, as transformers decides it."""
    cfg = text_config(model_or_config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        sliding = getattr(cfg, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * cfg.num_hidden_layers
    return list(types)


def uses_kvforge_attention(model: Any) -> bool:
    """True when `model` runs its attention through kvforge's function."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION


def enable_kvforge_attention(model: Any) -> None:
    """Switch `model` to the kvforge attention (transformers' public `set_attn_implementation`), after checking
    its family. Changes nothing else; a model already switched is left as it is. Raises KVForgeError for an
    unsupported family or an object that is not a transformers model."""
    check_supported(model)
    if uses_kvforge_attention(model):
        return
    if not callable(getattr(model, "set_attn_implementation", None)):
        raise KVForgeError(f"{type(model).__name__} is not a transformers model; pass the model, not its config, "
                           "to switch its attention to kvforge")
    # registered by `import kvforge` (the package's __init__), which has run before this module
    model.set_attn_implementation(ATTENTION)
