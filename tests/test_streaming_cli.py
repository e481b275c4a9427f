"""`kvforge ppl`, `kvforge stream` and their bad input (one line, exit 2), on a tiny saved model."""

import csv
import json

import pytest

from kvforge.cli import main
from kvforge.models import load_tokenizer, tiny_model

TEXT = ("Full fathom five thy father lies; of his bones are coral made; those are pearls that were his eyes: "
        "nothing of him that doth fade but doth suffer a sea-change into something rich and strange. ") * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", num_hidden_layers=2).save_pretrained(path)
    load_tokenizer("smollm2-135m").save_pretrained(path)
    (path / "text.txt").write_text(TEXT)
    return path


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ppl_table_is_written_and_resumed(model_dir, tmp_path, capsys):
    args = ["ppl", "--model", str(model_dir), "--text-file", str(model_dir / "text.txt"), "--tokens", "40",
            "--modes", "full,sw,ar", "--cache-sizes", "16", "--sinks", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    table = rows(tmp_path / "ppl.csv")
    assert list(table[0]) == ["mode", "cache_size", "sinks", "bits", "tokens", "ppl", "seconds"]
    assert [(r["mode"], r["cache_size"], r["sinks"]) for r in table] == [("full", "41", "0"), ("sw", "16", "4"),
                                                                         ("ar", "16", "0")]
    assert (tmp_path / "ppl.png").stat().st_size > 0 and json.loads((tmp_path / "run_meta.json").read_text())["commit"]
    table[1]["seconds"] = "123.0"  # a finished row is kept as it is, not run again
    with open(tmp_path / "ppl.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    assert main(args[:-6] + ["--cache-sizes", "16,48", "--sinks", "4", "--out", str(tmp_path)]) == 0
    again = rows(tmp_path / "ppl.csv")
    assert again[:3] == table and [(r["mode"], r["cache_size"]) for r in again[3:]] == [("sw", "48"), ("ar", "48")]
    # cache 48 ≥ 41 tokens: sw and ar are the full context
    assert float(again[3]["ppl"]) == pytest.approx(float(again[0]["ppl"]), rel=1e-4)
    assert float(again[4]["ppl"]) == pytest.approx(float(again[0]["ppl"]), rel=1e-4)


def test_ppl_rows_in_a_fresh_folder_then_resume_refuses_other_rows(model_dir, tmp_path, capsys):
    args = ["ppl", "--model", str(model_dir), "--text-file", str(model_dir / "text.txt"), "--tokens", "40",
            "--modes", "full,sw", "--cache-sizes", "8", "--sinks", "2", "--rows", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    table = rows(tmp_path / "ppl.csv")
    assert [(r["mode"], r["tokens"]) for r in table] == [("full", "40"), ("sw", "40")]
    assert json.loads((tmp_path / "run_meta.json").read_text())["rows"] == 2
    assert main(args[:-4] + ["--rows", "4", "--out", str(tmp_path)]) == 2
    assert "measured with --rows 2" in capsys.readouterr().err


def test_cuda_graph_flag_gives_the_same_table_and_text(model_dir, tmp_path, capsys):
    """`--cuda-graph` (on CPU: graph mode run eagerly) changes no number: the same perplexities, the same text."""
    base = ["ppl", "--model", str(model_dir), "--text-file", str(model_dir / "text.txt"), "--tokens", "40",
            "--modes", "sw,window", "--cache-sizes", "8", "--sinks", "2"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--cuda-graph", "--out", str(tmp_path / "b")]) == 0
    a, b = rows(tmp_path / "a" / "ppl.csv"), rows(tmp_path / "b" / "ppl.csv")
    assert [float(r["ppl"]) for r in a] == pytest.approx([float(r["ppl"]) for r in b], rel=1e-5)
    texts = []
    for extra in ([], ["--cuda-graph"]):
        capsys.readouterr()
        assert main(["stream", "--model", str(model_dir), "--cache-size", "10", "--num-tokens", "30",
                     "--prompt", "The sea"] + extra) == 0
        texts.append(capsys.readouterr().out.split("\n\n")[0])
    assert texts[0] == texts[1] and len(texts[0]) > len("The sea")


def test_kv_bits_rows_are_their_own(model_dir, tmp_path):
    """--kv-bits 4 quantizes sw (its row says 4) but not ar (no cache: 16); the 16-bit rows are not reused for it."""
    base = ["ppl", "--model", str(model_dir), "--text-file", str(model_dir / "text.txt"), "--tokens", "40",
            "--modes", "sw,ar", "--cache-sizes", "8", "--sinks", "2", "--out", str(tmp_path)]
    assert main(base) == 0
    assert main(base + ["--kv-bits", "4"]) == 0
    table = rows(tmp_path / "ppl.csv")
    assert [(r["mode"], r["bits"]) for r in table] == [("sw", "16"), ("ar", "16"), ("sw", "4")]
    assert table[2]["ppl"] != table[0]["ppl"]


def test_stream_prints_and_writes_latency(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kvforge.streaming.generate.BLOCK", 10)
    args = ["stream", "--model", str(model_dir), "--mode", "sw", "--cache-size", "12", "--num-tokens", "30",
            "--prompt", "The sea", "--compare-ar", "5", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("The sea") and "tokens/s" in out and "faster" in out
    lat = rows(tmp_path / "latency.csv")
    assert [r["tokens"] for r in lat] == ["10", "20", "30"]
    assert len({r["cache_bytes"] for r in lat}) == 1  # fixed memory
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ar"]["tokens"] == 5 and summary["speedup_vs_ar"] > 0


def test_ar_stream_from_a_prompt_longer_than_the_cache_is_its_definition(model_dir):
    """`ar` generation = greedy tokens, each from a plain forward over the last n tokens so far (prompt included)."""
    import torch

    from kvforge.streaming import AR
    from kvforge.streaming.generate import run_stream
    from kvforge.streaming.load import load_stream_model

    model, tok = load_stream_model(str(model_dir), dtype="float32", device="cpu")
    n, prompt = 12, TEXT[:200]
    got: list = []
    summary = run_stream(model, tok, AR(cache_size=n), prompt, 6, emit=got.append)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert summary["prompt_tokens"] == ids.shape[1] > 3 * n
    with torch.inference_mode():
        for _ in range(6):
            nxt = model(input_ids=ids[:, -n:]).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert "".join(got) == tok.decode(ids[0, -6:], skip_special_tokens=True)


def test_stopped_stream_keeps_finished_blocks_and_quiet_shows_progress(model_dir, tmp_path, capsys, monkeypatch):
    import kvforge.streaming.generate as gen

    monkeypatch.setattr(gen, "BLOCK", 10)
    real = gen.write_latency_csv
    written = []

    def stop_after_two(out, records):  # the run is killed right after its second block is on disk
        real(out, records)
        written.append(len(records))
        if len(records) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("kvforge.streaming.generate.write_latency_csv", stop_after_two)
    args = ["stream", "--model", str(model_dir), "--mode", "sw", "--cache-size", "12", "--num-tokens", "100000",
            "--prompt", "The sea", "--quiet", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert written == [1, 2]
    assert [r["tokens"] for r in rows(tmp_path / "latency.csv")] == ["10", "20"]
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(gen, "PROGRESS", 20)  # --quiet: a progress line every PROGRESS tokens, on stderr
    assert main(["stream", "--model", str(model_dir), "--mode", "sw", "--cache-size", "12", "--num-tokens", "40",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "20/40 tokens" in err and "40/40 tokens" in err and "10/40" not in err


@pytest.mark.parametrize("extra, message", [
    (["--mode", "sw", "--cache-size", "4", "--sinks", "4"], "not larger than the 4 sinks"),
    (["--mode", "kv", "--cache-size", "16"], "needs KV-Align networks"),
    (["--mode", "kv", "--cache-size", "16", "--kv-align", "NOWHERE"], "no KV-Align networks in"),
    (["--mode", "nope"], "unknown mode"),
])
def test_stream_bad_input_is_one_line_exit_2(model_dir, capsys, extra, message):
    assert main(["stream", "--model", str(model_dir), "--num-tokens", "3", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvforge: error:") and message in err and "\n" not in err


def test_ppl_kv_with_networks_for_another_model_exit_2(model_dir, tmp_path, capsys):
    from kvforge.streaming import KVAlign

    KVAlign.for_model(tiny_model("qwen2")).save(tmp_path / "nets")
    args = ["ppl", "--model", str(model_dir), "--text-file", str(model_dir / "text.txt"), "--tokens", "20",
            "--modes", "kv", "--cache-sizes", "8", "--kv-align", str(tmp_path / "nets"), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert err.startswith("kvforge: error:") and "do not fit" in err
