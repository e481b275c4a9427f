"""A model dispatched by accelerate with a split device map (hooks moving weights between devices per layer)
works with the kvforge cache and attention function: same answers as the undispatched model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvforge import generate, get_press
from kvforge.config import enable_kvforge_attention
from kvforge.models import tiny_model

CONTEXT = "Mira keeps bees on the hill behind the mill. She paints the hive doors blue every spring. " * 3


@pytest.mark.parametrize("press_name", [None, "snapkv", "adakv"])
def test_split_device_map_matches_single_device(tmp_path, smol_tokenizer, press_name):
    model = tiny_model("llama", num_hidden_layers=4)
    model.save_pretrained(tmp_path / "m")
    # layers 0-1 on the CPU, layers 2-3 offloaded to disk: accelerate's hooks load them for each forward
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload"))
    split.eval()
    enable_kvforge_attention(split)
    assert getattr(split, "hf_device_map", None) and "disk" in split.hf_device_map.values()
    press = None if press_name is None else get_press(press_name, compression_ratio=0.5)
    q = ["What colour are the doors?"]
    want = generate(model, smol_tokenizer, CONTEXT, q, press=press, max_new_tokens=12)
    got, cache = generate(split, smol_tokenizer, CONTEXT, q, press=press, max_new_tokens=12, return_cache=True)
    assert got == want
    if press is not None:
        assert cache.stats()["bytes"] < cache.stats()["uncompressed_bytes"]
