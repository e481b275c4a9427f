"""kvforge.link: link tokens (added, saved, loaded, checked), the training data and loss, `kvforge train kvlink`,
`kvforge link eval`, and the one-line errors for bad input."""

import csv
import json
import random

import pytest
import torch

from kvforge import KVForgeError
from kvforge.cli import main
from kvforge.link import Links, add_links, generate, load_links, prefill
from kvforge.link.data import collate, qa_sample, text_sample, training_sequence
from kvforge.link.evaluate import eval_sample
from kvforge.link.train import batch_loss
from kvforge.models import load_model, load_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    """A tiny llama saved as a model directory with SmolLM2's tokenizer."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def test_samples_move_only_the_gold():
    a, b = eval_sample(0, 3, 6, 0), eval_sample(0, 3, 6, 5)
    assert a.question == b.question and a.answers == b.answers
    assert a.documents[0] == b.documents[5] and a.documents[1:] == b.documents[:5]
    assert a.answers[0] in a.documents[0] and a.gold == [0]
    two = qa_sample(random.Random(1), 5, two_hop=True)
    assert len(set(two.gold)) == 2 and two.answers[0] in " ".join(two.documents[g] for g in two.gold)
    text = text_sample(random.Random(2), 3)
    assert len(text.documents) == 3 and text.answers[0] not in " ".join(text.documents)


def test_two_hop_eval_samples_need_two_documents_and_move_only_the_first_gold():
    """`--hops 2`: the first gold document sits at the asked position, the second elsewhere, the answer is in the
    second and never in the first (no one-document shortcut, e.g. a person living in their employer's city), and
    the set differs from the single-hop one."""
    for i in range(100):
        a, b = eval_sample(0, i, 6, 0, hops=2), eval_sample(0, i, 6, 4, hops=2)
        assert a.question == b.question and a.answers == b.answers
        assert a.gold[0] == 0 and b.gold[0] == 4 and len(set(a.gold)) == len(set(b.gold)) == 2
        assert a.documents[a.gold[0]] == b.documents[b.gold[0]]
        assert a.answers[0] in a.documents[a.gold[1]] and a.answers[0] not in a.documents[a.gold[0]]
        assert a.question != eval_sample(0, i, 6, 0).question


def test_link_eval_refuses_bad_hops(tmp_path):
    from kvforge.link.evaluate import EvalConfig, run_link_eval

    for hops, docs in ((3, 10), (2, 1)):
        with pytest.raises(KVForgeError, match=f"--hops {hops} with --docs {docs}; allowed: 1 or 2 hops"):
            run_link_eval("smollm2-135m", None, tmp_path / "x", EvalConfig(docs=docs, hops=hops, modes=("full",)))


def test_training_sequence_and_loss(smol_tokenizer):
    """Links follow each document (segment 0), labels cover the answer and its end only, and the loss is the
    answer cross-entropy of one forward with the segment mask (checked against full logits)."""
    tok = smol_tokenizer
    model = tiny_model("gemma3")
    links = Links(2, 4, tuple(tok.convert_ids_to_tokens([1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007])),
                  tuple(range(1000, 1008)))
    sample = qa_sample(random.Random(0), 3)
    ids, seg, labels = training_sequence(tok, sample, links, template=True)
    answer = tok(sample.answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for t, lab in zip(ids, labels) if lab != -100] == answer == ids[-len(answer):]
    for k in range(3):  # the links of slot k right after document k's tokens
        end = max(i for i, s in enumerate(seg) if s == k + 1)
        assert ids[end + 1 : end + 3] == links.ids_for(k) and seg[end + 1 : end + 3] == [0, 0]
    rows = [(ids, seg, labels), training_sequence(tok, text_sample(random.Random(1), 2), links, template=True)]
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        loss = batch_loss(model, batch)
        from kvforge.link.assemble import layer_masks, segment_mask

        t = batch["input_ids"].shape[1]
        pos = torch.arange(t)
        logits = model(input_ids=batch["input_ids"], position_ids=pos[None],
                       attention_mask=layer_masks(model, pos, pos, segment_mask(batch["segments"], batch["valid"]))
                       ).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)
    assert abs(float(loss) - float(want)) <= 1e-4


def test_a_causal_sample_is_the_ordinary_sequence_without_links(smol_tokenizer):
    """`causal=True` (the reference's unmasked 60%): the same prefix, documents, prompt and answer, no link tokens,
    every segment 0, so the segment mask is the causal mask; the labels are the same answer."""
    tok = smol_tokenizer
    links = Links(2, 4, tuple(tok.convert_ids_to_tokens(list(range(1000, 1008)))), tuple(range(1000, 1008)))
    sample = qa_sample(random.Random(3), 4)
    ids, seg, labels = training_sequence(tok, sample, links, template=True)
    cids, cseg, clabels = training_sequence(tok, sample, links, template=True, causal=True)
    assert cids == [t for t, s in zip(ids, seg) if not (s == 0 and t in links.ids)]
    assert set(cseg) == {0} and not set(cids) & set(links.ids)
    assert [t for t, lab in zip(cids, clabels) if lab != -100] == [t for t, lab in zip(ids, labels) if lab != -100]
    from kvforge.link.assemble import segment_mask

    t = len(cids)
    assert torch.equal(segment_mask(torch.tensor([cseg]))[0, 0], torch.ones(t, t, dtype=torch.bool).tril())


def test_causal_fraction_mixes_causal_samples_and_keeps_the_old_stream_at_zero(tmp_path, tiny_dir, smol_tokenizer,
                                                                             monkeypatch):
    """At the default 0 the samples (and so the training) are those of runs before the option; at 0.5 about half
    the sequences are causal (no links), logged by kind; outside [0, 1] a one-line error."""
    import kvforge.link.train as tr

    seen = []
    real = tr.training_sequence
    monkeypatch.setattr(tr, "training_sequence", lambda *a: seen.append(a[-1]) or real(*a))
    model, tok = load_model(str(tiny_dir))
    log0 = tr.train_kvlink(model, tok, tmp_path / "a", tr.TrainConfig(steps=2, batch=4, max_docs=3, n_links=2),
                           progress=False)
    assert seen == [False] * 8 and not any(k.startswith("causal_") for k in log0["samples"])
    seen.clear()
    model, tok = load_model(str(tiny_dir))
    log = tr.train_kvlink(model, tok, tmp_path / "b", tr.TrainConfig(steps=4, batch=4, max_docs=3, n_links=2,
                                                                        causal_fraction=0.5), progress=False)
    assert 3 <= sum(seen) <= 13 and sum(v for k, v in log["samples"].items() if k.startswith("causal_")) == sum(seen)
    with pytest.raises(KVForgeError, match=r"causal_fraction=1.5; allowed: a share in \[0, 1\]"):
        tr.train_kvlink(model, tok, tmp_path / "c", tr.TrainConfig(steps=1, causal_fraction=1.5), progress=False)


def test_links_added_saved_loaded_and_checked(tmp_path, tiny_dir):
    model, tok = load_model(str(tiny_dir))
    rows = model.get_input_embeddings().weight.shape[0]
    links = add_links(model, tok, n_links=3, max_docs=4)
    assert len(set(links.ids)) == 12 and min(links.ids) >= rows  # new ids, new embedding rows
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > rows
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model2, tok2 = load_model(str(tmp_path / "m"))
    assert load_links(model2, tok2) == links
    with pytest.raises(KVForgeError, match="trained for another tokenizer"):
        prefill(model2, load_tokenizer(str(tiny_dir)), ["a doc", "b doc"], "q?", links=links)
    with pytest.raises(KVForgeError, match="no link tokens"):
        load_links(tiny_model("llama"), tok)
    with pytest.raises(KVForgeError, match="at most 4 documents"):
        prefill(model2, tok2, ["d"] * 5, "q?", links=links)


def test_bad_input_is_one_line(tiny_dir, smol_tokenizer):
    model = tiny_model("llama")
    for docs, match in ([], "non-empty list"), (["word " * 2100, "x"], "exceed the model's 2048 positions"):
        with pytest.raises(KVForgeError, match=match) as err:
            prefill(model, smol_tokenizer, docs, "q?", template=False)
        assert "\n" not in str(err.value)
    with pytest.raises(KVForgeError, match="positions"):
        generate(model, smol_tokenizer, ["word " * 2040], "q?", template=False, max_new_tokens=16)


def test_link_eval_summary_has_intervals_and_an_all_positions_row():
    """Per (mode, position) and per mode over all positions: n, mean, Wilson 95% interval, median TTFT (None when
    the run skipped timing)."""
    from kvforge.link.evaluate import summarize

    rows = [{"mode": "naive", "gold_position": p, "score": s, "ttft_ms": t}
            for p, s, t in ((0, 1.0, 10.0), (0, 0.0, 30.0), (0, 0.0, 20.0), (9, 1.0, None), (9, 1.0, None))]
    by = {(r["mode"], r["gold_position"]): r for r in summarize(rows)}
    first, last, both = by[("naive", 0)], by[("naive", 9)], by[("naive", "all")]
    assert (first["n"], first["score"], first["ttft_ms"]) == (3, 0.3333, 20.0)
    assert (first["ci_low"], first["ci_high"]) == (0.0615, 0.7923)  # Wilson, 1 of 3
    assert last["ttft_ms"] is None and last["ci_high"] == 1.0 and last["ci_low"] == pytest.approx(0.3424, abs=1e-4)
    assert (both["n"], both["score"]) == (5, 0.6) and both["ci_low"] < 0.6 < both["ci_high"]
    assert list(by)[-1] == ("naive", "all")


@pytest.mark.slow  # a CLI training run end to end (~40 s on 2 cores); `make test-slow`
def test_train_and_eval_cli(tmp_path, tiny_dir, capsys):
    """`kvforge train kvlink` (full and LoRA) writes a loadable model with links, its log and loss plot;
    `kvforge link eval` writes summary.csv with the exact columns, resumes, and refuses another set-up."""
    out = tmp_path / "links"
    assert main(["train", "kvlink", "--model", str(tiny_dir), "--out", str(out), "--steps", "3", "--batch", "2",
                 "--max-docs", "3", "--n-links", "2", "--lr", "1e-3"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["loss"]) == 3 and all(x == x for x in log["loss"]) and (out / "loss.png").stat().st_size
    lora = tmp_path / "lora"
    assert main(["train", "kvlink", "--model", str(tiny_dir), "--out", str(lora), "--steps", "2", "--batch", "1",
                 "--max-docs", "3", "--n-links", "2", "--lora", "2", "--lr", "1e-2"]) == 0
    model, tok = load_model(str(lora))
    base = tiny_model("llama")
    links = load_links(model, tok)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)
    assert links.n_links == 2 and links.max_docs == 3

    ev = tmp_path / "eval"
    cmd = ["link", "eval", "--model", str(tiny_dir), "--links", str(out), "--docs", "3", "--samples", "1",
           "--positions", "first,last", "--max-new-tokens", "2", "--recompute-k", "4", "--out", str(ev)]
    assert main(cmd) == 0
    with (ev / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["mode", "gold_position", "n", "score", "ci_low", "ci_high", "ttft_ms"]
    assert {(r["mode"], r["gold_position"], r["n"]) for r in rows} == {
        (m, p, n) for m in ("full", "naive", "links", "recompute") for p, n in (("0", "1"), ("2", "1"), ("all", "2"))}
    lines = (ev / "results.jsonl").read_text().splitlines()
    assert main(cmd) == 0 and (ev / "results.jsonl").read_text().splitlines() == lines  # resumed: nothing redone
    assert (ev / "summary.png").stat().st_size
    capsys.readouterr()
    assert main(cmd[:-2] + ["--seed", "1", "--out", str(ev)]) == 2
    assert "another seed" in capsys.readouterr().err
    assert main(cmd[:-2] + ["--modes", "full", "--no-ttft", "--out", str(tmp_path / "fast")]) == 0  # answers only
    with (tmp_path / "fast" / "summary.csv").open() as f:
        assert {r["ttft_ms"] for r in csv.DictReader(f)} == {""}
    capsys.readouterr()
    assert main(["link", "eval", "--model", str(tiny_dir), "--modes", "links", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().endswith("needs --links DIR (a model saved by `kvforge train kvlink`)")


def test_link_lr_trains_the_link_rows_apart_and_freezes_the_other_rows(tmp_path, smol_tokenizer):
    """`link_lr`: the decoder fine-tunes at `lr`, the link rows at their own rate (Adam's first steps move each
    element by about its group's rate), every other embedding row stays as it was."""
    import copy

    from kvforge.link.train import TrainConfig, train_kvlink

    smol_tokenizer = copy.deepcopy(smol_tokenizer)  # adding link tokens changes a tokenizer: not the shared one
    moved = {}
    for link_lr in (None, 1e-2):
        model = tiny_model("llama")
        add_links(model, smol_tokenizer, 2, 3)  # training continues with the links a model has
        before = model.get_input_embeddings().weight.detach().clone()
        q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        cfg = TrainConfig(steps=2, batch=1, lr=1e-5, warmup=1, n_links=2, max_docs=3, link_lr=link_lr)
        train_kvlink(model, smol_tokenizer, tmp_path / str(link_lr), cfg, progress=False)
        after = model.get_input_embeddings().weight.detach()
        ids = sorted(load_links(model, smol_tokenizer).ids)
        others = torch.ones(len(after), dtype=torch.bool)
        others[ids] = False
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)  # the decoder trains either way
        moved[link_lr] = float((after[ids] - before[ids]).abs().max())
        if link_lr:
            assert torch.equal(after[others], before[others])
    assert moved[None] < 3e-5 < 3e-3 < moved[1e-2]
