"""Every registered press × every family, batched, through `kvforge.generate` — generated from the registry."""

import pytest
from helpers import FAMILIES

from kvforge import generate, get_press, list_presses
from kvforge.cache.coded import CodedLayer
from kvforge.models import tiny_model
from kvforge.presses.registry import PRESSES

# presses that need arguments to be built (the registry gives everything else)
ARGS = {"composed": {"presses": ["snapkv", "knorm"]}}
# quantizers: a small residual window and groups so the short contexts are really coded
for _name in ("kivi", "gear", "kvquant"):
    ARGS[_name] = {"group_size": 4, "residual_length": 4}
CONTEXTS = ["The red fox sleeps under the old oak tree near the river. " * 3, "A short note about the mill."]


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list_presses())
def test_press_runs_batched_on_family(models, smol_tokenizer, name, family):
    ratio = {} if PRESSES[name].ratio_free else {"compression_ratio": 0.5}
    press = get_press(name, **ratio, **ARGS.get(name, {}))
    answers, cache = generate(models[family], smol_tokenizer, CONTEXTS, ["Where does the fox sleep?"], press=press,
                              max_new_tokens=3, return_cache=True)
    assert len(answers) == 2 and all(len(a) == 1 and isinstance(a[0], str) for a in answers)
    stats = cache.stats()
    assert stats["bytes"] > 0
    if PRESSES[name].kind in ("quantization", "channel"):  # coded layers really hold fewer bytes
        assert any(isinstance(layer, CodedLayer) for layer in cache.layers)
        if name != "gear":  # rank-4 factors and 2% outliers outweigh 4-bit codes at head_dim 16, group 4
            assert stats["bytes"] < stats["uncompressed_bytes"]
