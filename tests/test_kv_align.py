"""KV-Align (kvforge.streaming.kvalign / train): the pairs are what they claim, training reduces the validation loss,
the networks save, load, apply after evictions, and refuse another model."""

import json
from importlib.resources import files

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvforge.cli import main
from kvforge.errors import KVForgeError
from kvforge.models import load_tokenizer, tiny_model
from kvforge.streaming import KV, SW, KVAlign, Stream
from kvforge.streaming.train import make_pairs

TEXT = files("kvforge").joinpath("data/example_context.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def pairs_of(model, c=10, s=2, seed=0):
    ids = torch.randint(3, 500, (2, c + 2 * (c - s)), generator=torch.Generator().manual_seed(seed))
    return make_pairs(model, ids, c, s, snapshots=3, per_snapshot=600, generator=torch.Generator().manual_seed(0))


def test_pairs_are_the_cache_and_the_recomputation():
    """One rotary layer: K (pre-RoPE) and V depend on the token alone, so stored = recomputed; a second layer does
    not (its entries carry the evicted context); GPT-2 entries carry their stale positions even in one layer."""
    one = pairs_of(tiny_model("llama", num_hidden_layers=1, vocab_size=512))
    torch.testing.assert_close(one["xk"], one["yk"], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(one["xv"], one["yv"], rtol=2e-3, atol=2e-3)
    assert one["shift"].min() >= 1 and one["shift"].max() == 7  # shifts 1..W-1 of a full cache occur
    two = pairs_of(tiny_model("llama", num_hidden_layers=2, vocab_size=512))
    upper = two["layer"] == 1
    assert (two["xv"][upper].float() - two["yv"][upper].float()).abs().mean() > 1e-2
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512, n_positions=64)).eval()
    g = pairs_of(gpt2)
    assert (g["xk"].float() - g["yk"].float()).abs().mean() > 1e-2


def test_pairs_from_a_graph_mode_stream_are_the_same():
    """`cuda_graph=True` streams the text in graph mode (device counters; eager on CPU): the very same pairs."""
    model = tiny_model("llama", num_hidden_layers=2, vocab_size=512)
    ids = torch.randint(3, 500, (2, 26), generator=torch.Generator().manual_seed(1))
    a, b = (make_pairs(model, ids, 10, 2, snapshots=3, per_snapshot=600, generator=torch.Generator().manual_seed(0),
                       cuda_graph=g) for g in (False, True))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_train_cli_reduces_validation_loss_and_the_networks_apply(tok, tmp_path):
    model_dir = tmp_path / "model"
    model = tiny_model("llama", num_hidden_layers=2)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "nets"
    args = ["train", "kv-align", "--model", str(model_dir), "--text-file", str(tmp_path / "text.txt"), "--out",
            str(out), "--cache-sizes", "12", "--sinks", "2", "--streams", "4", "--snapshots", "4", "--epochs", "3",
            "--per-snapshot", "512", "--batch-size", "64", "--num-pos", "32", "--key-hidden", "32", "--value-hidden",
            "32", "--alphas", "1", "--lm-steps", "0"]
    assert main(args) == 0
    record = json.loads((out / "kv_align.json").read_text())["trained"]
    assert max(record["val_loss"]) < record["val_identity"]  # better than leaving the entries as they are
    assert record["pairs"] > 0 and (out / "pairs.pt").exists()

    nets = KVAlign.load(out)
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :40]
    sw = Stream(model, SW(cache_size=12, n_sink=2)).step(ids)
    kv = Stream(model, KV(cache_size=12, n_sink=2, nets=nets)).step(ids)
    torch.testing.assert_close(kv[:, :12], sw[:, :12])  # nothing evicted: nothing to align
    assert (kv[:, 13:] - sw[:, 13:]).abs().max() > 1e-3  # after evictions the networks rewrite the window
    assert torch.isfinite(kv).all()


def test_networks_save_load_round_trip_and_refuse_another_model(tmp_path):
    model = tiny_model("llama", vocab_size=512)
    nets = KVAlign.for_model(model, num_pos=16, key_hidden=[8], value_hidden=[8, 8])
    torch.manual_seed(1)
    for p in list(nets.key_net.parameters()) + list(nets.value_net.parameters()):
        p.data.normal_()
    nets.save(tmp_path)
    back = KVAlign.load(tmp_path)
    x, shift = torch.randn(1, 2, 5, 16), torch.arange(1, 6)
    for a, b in zip(nets.apply(1, x, x, shift), back.apply(1, x, x, shift)):
        torch.testing.assert_close(a, b)
    back.check_model(model)
    with pytest.raises(KVForgeError) as e:
        back.check_model(tiny_model("llama", vocab_size=512, seed=3))
    assert "do not fit" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KVForgeError) as e:
        KVAlign.load(tmp_path / "missing")
    assert "no KV-Align networks" in str(e.value) and "\n" not in str(e.value)


def test_calibrated_strength_is_the_validation_loss_minimum_and_zero_is_sw(tok, tmp_path):
    """Training ends by streaming validation text through KV at each α per cache size and keeping the α of lowest
    loss: the recorded losses are those of `stream_nll` over the same rows, the chosen α is their argmin, α = 0
    gives exactly `sw`, and sizes not calibrated take the nearest calibrated size's α."""
    from kvforge.streaming.ppl import stream_nll
    from kvforge.streaming.train import TrainConfig, calibrate

    model = tiny_model("llama", num_hidden_layers=2)
    nets = KVAlign.for_model(model, num_pos=32, key_hidden=[16], value_hidden=[16])
    torch.manual_seed(2)
    for p in list(nets.key_net.parameters()) + list(nets.value_net.parameters()):
        p.data.normal_(0, 0.3)  # a strong, untrained correction: α matters
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    cfg = TrainConfig(cache_sizes=[10, 14], n_sink=2, alphas=[0.0, 0.5, 1.0], calib_rows=2, calib_tokens=20)
    table = calibrate(model, nets, ids, cfg, progress=False)
    for size in (10, 14):
        x = ids[: 2 * (size + 21)].view(2, size + 21)
        for alpha in (0.0, 0.5, 1.0):
            nll = stream_nll(model, x, KV(size, 2, nets=nets, alpha=alpha))[:, size:].double().mean()
            assert table[str(size)][str(alpha)] == pytest.approx(float(nll), rel=1e-6)
        losses = table[str(size)]
        assert nets.spec.strength[str(size)] == float(min(losses, key=losses.get))
    keys, shift = torch.randn(1, 2, 5, 16), torch.arange(1, 6)  # α scales the correction, not the network's input
    full, half = nets.apply(1, keys, keys, shift), nets.apply(1, keys, keys, shift, alpha=0.5)
    for a, b in zip(full, half):
        torch.testing.assert_close(b - keys, 0.5 * (a - keys))
    x = ids[:40][None]
    torch.testing.assert_close(stream_nll(model, x, KV(10, 2, nets=nets, alpha=0.0)),
                               stream_nll(model, x, SW(10, 2)), rtol=0, atol=0)
    assert nets.spec.strength_for(11) == nets.spec.strength["10"]
    assert nets.spec.strength_for(100) == nets.spec.strength["14"]
    nets.save(tmp_path)
    assert KVAlign.load(tmp_path).spec.strength == nets.spec.strength


def test_networks_are_saved_before_the_calibration_runs(tok, tmp_path, monkeypatch):
    """A stopped calibration (the GPU machine taken back) keeps the trained networks on disk, without a strength
    (α = 1 everywhere until calibrated); a finished run records the strength."""
    import kvforge.streaming.train as train
    from kvforge.streaming.train import TrainConfig, train_kv_align

    model = tiny_model("llama", num_hidden_layers=2)
    cfg = TrainConfig(cache_sizes=[10], n_sink=2, streams=2, snapshots=2, per_snapshot=64, epochs=1, batch_size=32,
                      num_pos=32, key_hidden=[16], value_hidden=[16], alphas=[0.0, 1.0], calib_rows=1,
                      calib_tokens=8, lm_steps=0)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "calibrate", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_kv_align(model, tok, TEXT, tmp_path / "a", cfg, progress=False)
    kept = KVAlign.load(tmp_path / "a")
    assert kept.spec.strength == {} and kept.spec.strength_for(10) == 1.0
    assert kept.spec.trained["val_loss"] and kept.spec.trained["steps"] > 0  # trained, not the identity:
    assert any(float(p.detach().abs().sum()) > 0 for p in kept.key_net.fcs[-1].parameters())
    monkeypatch.undo()
    done = train_kv_align(model, tok, TEXT, tmp_path / "a", cfg, progress=False)  # reuses the cached pairs
    assert set(KVAlign.load(tmp_path / "a").spec.strength) == {"10"} == set(done.spec.strength)
