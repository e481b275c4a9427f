"""KV-Align trained on the next-token loss through the frozen model (kvforge.streaming.tune): the loss it trains on
is exactly the `kv` mode's NLL at inference, its gradient reaches both networks and nothing else, the cache keeps no
autograd history, and training lowers the loss it is trained on, on an absolute-position and a rotary model."""

import json
from importlib.resources import files

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvforge.cli import main
from kvforge.models import load_tokenizer, tiny_model
from kvforge.streaming import KV, KVAlign
from kvforge.streaming.ppl import stream_nll
from kvforge.streaming.tune import TrainStream, TuneConfig, tune

TEXT = files("kvforge").joinpath("data/example_context.txt").read_text(encoding="utf-8")


def models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    return {"gpt2": gpt2, "llama": tiny_model("llama", num_hidden_layers=2, vocab_size=64)}


def nets_for(model, seed=1):
    nets = KVAlign.for_model(model, num_pos=32, key_hidden=[16], value_hidden=[16], n_sink=2)
    torch.manual_seed(seed)
    for p in list(nets.key_net.fcs[-1].parameters()) + list(nets.value_net.fcs[-1].parameters()):
        p.data.normal_(0, 0.1)  # not the identity: the correction changes the logits
    return nets


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_loss_is_the_kv_mode_nll_and_its_gradient_reaches_the_networks(family):
    model = models()[family].requires_grad_(False)  # as `tune` freezes it
    nets = nets_for(model)
    ids = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(2))
    stream = TrainStream(model, nets, 10, TuneConfig(rows=2, n_sink=2), ids, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2 * (10 - 2)):  # the whole stream: filling transition and steady state
        loss = stream.loss()
        loss.backward()
        losses.append(float(loss.detach()))
    reference = stream_nll(model, stream.x.cpu(), KV(10, 2, nets=nets, alpha=1.0))[:, 10:]  # inference's kv mode
    torch.testing.assert_close(torch.tensor(losses), reference.mean(0).float(), rtol=1e-5, atol=1e-5)
    for net in (nets.key_net, nets.value_net):
        assert net.fcs[0].weight.grad is not None and net.fcs[0].weight.grad.abs().sum() > 0
    for layer in stream.cache.layers:  # stored entries are values: no graph reaches into later steps
        k, v = layer.raw()
        assert not k.requires_grad and not v.requires_grad


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tuning_lowers_the_validation_loss_it_trains_on(family):
    """A text of one 13-token pattern repeated: the networks can make the evicted context's loss cheaper; the kept
    networks are the best validated ones, below `sw` (the identity it starts from)."""
    model = models()[family]
    nets = KVAlign.for_model(model, num_pos=32, key_hidden=[16], value_hidden=[16], n_sink=2)
    ids = torch.randint(0, 64, (13,), generator=torch.Generator().manual_seed(3)).repeat(40)
    cfg = TuneConfig(steps=30, rows=2, n_sink=2, eval_every=10, val_rows=2, val_tokens=16, lr=1e-2)
    record = tune(model, nets, ids, ids, [10], cfg, progress=False)
    start, best = record["val"][0]["10"], min(v["10"] for v in record["val"])
    assert start == pytest.approx(record["val_sw"]["10"], rel=1e-6)  # untrained networks are the identity
    assert best < start - 0.02
    kept = [v["10"] for v in record["val"] if v["step"] == record["best_step"]][0]
    assert kept == best
    from kvforge.streaming.tune import validation_loss

    assert validation_loss(model, nets, ids, [10], cfg)["10"] == pytest.approx(best, rel=1e-6)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # frozen while tuning, not after


def test_train_cli_runs_the_next_token_stage_and_refuses_bad_counts(tmp_path, capsys):
    tok = load_tokenizer("smollm2-135m")
    model_dir = tmp_path / "model"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    base = ["train", "kv-align", "--model", str(model_dir), "--text-file", str(tmp_path / "text.txt"),
            "--cache-sizes", "12", "--sinks", "2", "--streams", "2", "--snapshots", "2", "--epochs", "1",
            "--per-snapshot", "64", "--batch-size", "32", "--num-pos", "32", "--key-hidden", "16",
            "--value-hidden", "16", "--alphas", "0,1", "--calib-tokens", "8"]
    assert main([*base, "--out", str(tmp_path / "nets"), "--lm-steps", "3", "--lm-rows", "2",
                 "--lm-eval-every", "2"]) == 0
    trained = json.loads((tmp_path / "nets" / "kv_align.json").read_text())["trained"]
    assert trained["lm"]["steps"] == 3 and [v["step"] for v in trained["lm"]["val"]] == [0, 2, 3]
    assert set(trained["calibration"]) == {"12"}  # the strength is chosen after the next-token stage
    capsys.readouterr()
    for flag in ("--lm-steps", "--lm-rows"):
        assert main([*base, "--out", str(tmp_path / "bad"), flag, "-1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and "allowed" in err[0]
