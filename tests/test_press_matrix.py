"""Every registered press × every family, batched, through `kvforge.generate` — generated from the registry."""

import pytest

from kvforge import generate, get_press, list_presses
from kvforge.models import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"]
# presses that need arguments to be built (the registry gives everything else)
ARGS = {"composed": {"presses": ["snapkv", "knorm"]}}
CONTEXTS = ["The red fox sleeps under the old oak tree near the river. " * 3, "A short note about the mill."]


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list_presses())
def test_press_runs_batched_on_family(models, smol_tokenizer, name, family):
    press = get_press(name, compression_ratio=0.5, **ARGS.get(name, {}))
    answers, cache = generate(models[family], smol_tokenizer, CONTEXTS, ["Where does the fox sleep?"], press=press,
                              max_new_tokens=3, return_cache=True)
    assert len(answers) == 2 and all(len(a) == 1 and isinstance(a[0], str) for a in answers)
    assert cache.stats()["bytes"] > 0
