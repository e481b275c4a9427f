"""Bad input, one row per input: every user mistake is one line naming the value and what is allowed — on the CLI
exit status 2 and exactly one stderr line `kvforge: error: ...`, in the API a `KVForgeError` — and it is refused
before the work it would spoil (rows marked `loads=False` must not even load the model). Plus a property test:
random press specs parse or raise `KVForgeError`, never another exception."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
from helpers import CONTEXT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvforge.models
from kvforge import KVCache, KVForgeError, generate, get_press, load_model
from kvforge.cli import build_parser, main
from kvforge.eval.bench import run_bench
from kvforge.eval.runner import run_eval
from kvforge.eval.tasks import TASKS
from kvforge.presses.registry import PRESSES, parse_press

GB16 = 16 * 10**9  # the memory every row sees as available (an 8B model in float32 needs 32.1 GB)

# (argv with {placeholders} for the files of the `paths` fixture, the message fragment, whether the model loads
# before the refusal: only checks that need the model's own numbers may come after it)
CLI_ROWS = [
    # the parser itself
    ([], "the following arguments are required: command", False),
    (["nope"], "invalid choice: 'nope'", False),
    # generate
    (["generate", "--press", "nope"], "unknown press 'nope'", False),
    (["generate", "--press", "snapkv", "--compression-ratio", "1.2"], "compression_ratio=1.2", False),
    (["generate", "--press", "knorm", "--budget", "0"], "budget=0", False),
    (["generate", "--press", "snapkv:knorm"], "has no option 'press'", False),
    (["generate", "--compression-ratio", "0.5"], "need --press", False),
    (["generate", "--quant", "snapkv"], "is not a quantizer", False),
    (["generate", "--bits", "2"], "--bits needs --quant", False),
    (["generate", "--quant", "kivi", "--bits", "3"], "kivi: bits=3", False),
    (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: 0; allowed: an integer >= 1", False),
    (["generate", "--max-new-tokens", "x"], "argument --max-new-tokens: 'x' is not a whole number", False),
    (["generate", "--context-file", "{latin1}", "--question", "q?"],
     "as UTF-8 text: byte 0xe9 at offset 3 is not valid UTF-8", False),
    (["generate", "--context-file", "{empty}", "--question", "q?"], "is empty or only whitespace", False),
    (["generate", "--context-file", "{blank}", "--question", "q?"], "is empty or only whitespace", False),
    (["generate", "--context-file", "{doc}"], "--context-file needs --question", False),
    (["generate", "--context-file", "{missing}", "--question", "q?"], "No such file", False),
    (["generate", "--context-file", "{adir}", "--question", "q?"], "Is a directory", False),
    (["generate", "--context-file", "{long}", "--question", "q?"], "exceeds the model's maximum of 8192 tokens", True),
    (["generate", "--model", "nope"], "unknown model 'nope'", False),
    (["generate", "--model", "{adir}"], "has no config.json", False),
    (["generate", "--dtype", "int3"], "bad dtype 'int3'", False),
    (["generate", "--device", "tpu"], "bad device 'tpu'", False),
    (["generate", "--prefill-chunk", "0"], "--prefill-chunk '0': 0 tokens; allowed: lengths >= 1", False),
    (["generate", "--prefill-chunk", "4k,8k"], "give one chunk size (e.g. 4k); only bench takes a list", False),
    (["generate", "--press", "observed_attention", "--compression-ratio", "0.5", "--prefill-chunk", "64"],
     "observed_attention cannot compress a prefill chunk by chunk", False),
    # eval
    (["eval", "--tasks", "nope", "--presses", "knorm", "--out", "{out}"], "unknown task 'nope'; allowed: ", False),
    (["eval", "--tasks", "", "--presses", "knorm", "--out", "{out}"], "task list is empty", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--device", "tpu"],
     "bad device 'tpu'; allowed: cpu, cuda, cuda:N, auto", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--dtype", "int8"],
     "bad dtype 'int8'; allowed: bfloat16, float16, float32", False),
    (["eval", "--tasks", "facts_qa", "--presses", "", "--out", "{out}"], "press list is empty", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm"], "the following arguments are required: --out", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--samples", "0"],
     "argument --samples: 0; allowed: an integer >= 1", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--max-new-tokens", "0"],
     "argument --max-new-tokens: 0", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--press-batch", "0"],
     "argument --press-batch: 0", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--length", "0"],
     "--length '0': 0 tokens; allowed: lengths >= 1", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--length", "2k,abc"],
     "'abc' is not a token count", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--length", "100000"],
     "length 100000 is outside the model's window of 1..8192 tokens", True),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--ratios", "0.5,1.5"],
     "ratio 1.5 is outside the allowed range [0, 1)", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--ratios", "half"],
     "cannot read 'half'", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm,snapkv@compression_ratio=1.5", "--out", "{out}"],
     "compression_ratio is not a spec option", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm@budget=64", "--out", "{out}"],
     "budget is not a spec option", False),
    (["eval", "--tasks", "facts_qa", "--presses", "kivi@bits=2@bits=4", "--out", "{out}"],
     "option 'bits' is given twice", False),
    (["eval", "--tasks", "facts_qa", "--presses", "adakv:", "--out", "{out}"], "names no inner press", False),
    (["eval", "--tasks", "facts_qa", "--presses", "snapkv@window_size=-1", "--out", "{out}"],
     "snapkv: window_size=-1", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--quant", "kivi", "--bits", "3"],
     "kivi: bits=3", False),
    (["eval", "--tasks", "facts_qa", "--presses", "kvzip", "--out", "{out}", "--query-aware"],
     "query_aware is not supported", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{blocker}/sub"], "is not writable", False),
    # report
    (["report", "{adir}"], "has no results.jsonl", False),
    (["report"], "the following arguments are required: dir", False),
    # bench
    (["bench", "--presses", "none"], "give --model M, or --random-weights", False),
    (["bench", "--random-weights"], "bench of random-weight 'llama3.1-8b' (float32 weights + the KV cache of 1 x 32768 "
     "tokens) needs 40.7 GB", False),
    (["bench", "--random-weights", "--config", "nope"], "unknown random config 'nope'", False),
    # random weights may run past the config's positions (no trained positions): the memory check still refuses
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--context", "200k", "--batch", "256"],
     "KV cache of 256 x 204800 tokens) needs", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--context", "0"], "--context '0': 0 tokens", False),
    (["bench", "--random-weights", "--batch", "0"], "argument --batch: 0; allowed: an integer >= 1", False),
    (["bench", "--random-weights", "--new-tokens", "0"], "argument --new-tokens: 0", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--ratios", "1.5"], "ratio 1.5 is outside", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--presses", "none,snapkv@compression_ratio=2"],
     "compression_ratio is not a spec option", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--hf-caches", "static"],
     "unknown transformers cache 'static'", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--hf-caches", "quanto@bits=x"], "bad option", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--layouts", "ragged"], "unknown layout", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--prefill-chunk", "none,-4"],
     "--prefill-chunk '-4': -4 tokens; allowed: lengths >= 1", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--prefill-chunk", ","], "gives no chunk size", False),
    (["bench", "--random-weights", "--memory-limit", "4"], "--memory-limit bounds the searches of", False),
    (["bench", "--random-weights", "--max-context", "--max-batch"], "two searches; give one of them", False),
    (["bench", "--random-weights", "--max-context", "--memory-limit", "-1"], "--memory-limit -1.0: allowed: a number",
     False),
    (["bench", "--random-weights", "--max-context", "--presses", "none,nope"], "unknown press 'nope'", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--presses", "none,nacl", "--prefill-chunk", "4k"],
     "nacl cannot compress a prefill chunk by chunk", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--prefill-chunk", "0"],
     "--prefill-chunk '0': 0 tokens", False),
    (["eval", "--tasks", "facts_qa", "--presses", "kvzip", "--out", "{out}", "--prefill-chunk", "64"],
     "kvzip cannot compress a prefill chunk by chunk", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--prefill-chunk", "64",
      "--query-aware"], "drop --prefill-chunk or --query-aware", False),
    (["bench", "--random-weights", "--compile", "sometimes"], "invalid choice: 'sometimes'", False),
    (["bench", "--model", "{adir}"], "has no config.json", False),
    (["bench", "--random-weights", "--config", "llama3.2-1b", "--out", "{blocker}/sub"], "is not writable", False),
    # presses
    (["presses", "--bogus"], "unrecognized arguments: --bogus", False),
    # prompt formats
    (["generate", "--prompt-format", "chatml"], "argument --prompt-format: invalid choice: 'chatml'", False),
    (["eval", "--tasks", "facts_qa", "--presses", "knorm", "--out", "{out}", "--prompt-format", "raw"],
     "argument --prompt-format: invalid choice: 'raw'", False),
    # demo
    (["demo", "--samples", "0"], "argument --samples: 0", False),
    (["demo", "--model", "nope", "--out", "{out}"], "unknown model 'nope'", False),
    # kvzip-head-scores
    (["kvzip-head-scores"], "the following arguments are required: --out", False),
    (["kvzip-head-scores", "--out", "{out}/s.json", "--samples", "0"], "argument --samples: 0", False),
    (["kvzip-head-scores", "--out", "{out}/s.json", "--length", "-5"], "argument --length: -5", False),
    (["kvzip-head-scores", "--out", "{adir}"], "is a directory", False),
    (["kvzip-head-scores", "--out", "{blocker}/s.json"], "cannot be written", False),
    (["kvzip-head-scores", "--out", "{out}/s.json", "--length", "100000"],
     "--length 100000 does not fit the model's 8192 positions", True),
    # headkv-scores
    (["headkv-scores", "--out", "{out}/h.json", "--task", "nope"], "unknown task 'nope'", False),
    (["headkv-scores", "--out", "{out}/h.json", "--samples", "0"], "argument --samples: 0", False),
    (["headkv-scores", "--out", "{out}/h.json", "--length", "100000"],
     "length 100000 does not fit the model's 8192 positions", True),
    # viz attention (the attention map)
    (["viz"], "the following arguments are required: what", False),
    (["viz", "attention"], "the following arguments are required: --context-file", False),
    (["viz", "attention", "--context-file", "{latin1}"], "is not valid UTF-8", False),
    (["viz", "attention", "--context-file", "{blank}"], "is empty or only whitespace", False),
    (["viz", "attention", "--context-file", "{doc}", "--layers", "a,b"], "--layers 'a,b'", False),
    (["viz", "attention", "--context-file", "{doc}", "--layers", "99"], "layer 99 does not exist; allowed: 0..29",
     True),
    # ppl (streaming): the text file is read before any work
    (["ppl", "--text-file", "{latin1}", "--out", "{out}/p"], "is not valid UTF-8", False),
    (["ppl", "--text-file", "{doc}", "--kv-bits", "3", "--out", "{out}/p"], "invalid choice: 3", False),
    (["stream", "--kv-bits", "5"], "invalid choice: 5 (choose from 16, 8, 4, 2)", False),
]


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\t \n")
    (tmp_path / "doc.txt").write_text("The Dunmore archive was founded in 1921 by Ada Kell.")
    (tmp_path / "long.txt").write_text("word " * 9000)
    (tmp_path / "adir").mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")
    names = ["latin1", "empty", "blank", "doc", "long"]
    return {**{n: str(tmp_path / f"{n}.txt") for n in names}, "missing": str(tmp_path / "missing.txt"),
            "adir": str(tmp_path / "adir"), "blocker": str(tmp_path / "blocker"), "out": str(tmp_path / "out")}


@pytest.fixture
def loads(monkeypatch, smol):
    """`load_model` recording its calls; the embedded model comes from the session's fixture (no reload), anything
    else goes to the real loader (which refuses bad names, dtypes and devices before loading). Every device has
    16 GB available."""
    real, calls = kvforge.models.load_model, []

    def fake(name_or_path="smollm2-135m", dtype=None, device=None, random_weights=False):
        if name_or_path == "smollm2-135m" and dtype is None and device in (None, "cpu") and not random_weights:
            loaded = smol
        else:
            loaded = real(name_or_path, dtype=dtype, device=device, random_weights=random_weights)
        calls.append(name_or_path)  # loaded: the checks before loading passed
        return loaded

    monkeypatch.setattr(kvforge.models, "load_model", fake)
    monkeypatch.setattr(kvforge.models, "available_memory", lambda device: GB16)
    return calls


@pytest.mark.parametrize(("argv", "fragment", "after_load"), CLI_ROWS,
                         ids=[" ".join(r[0])[:60] or "(no arguments)" for r in CLI_ROWS])
def test_cli_bad_input(argv, fragment, after_load, paths, loads, capsys):
    argv = [a.format(**paths) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kvforge: error: "), err
    assert fragment in err, err
    assert bool(loads) == after_load, f"the model loaded: {loads}" if loads else "the refusal needs the model"
    assert not os.path.exists(paths["out"]), "a refused run wrote its --out"


def _leaf_commands(parser, path=()):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path
        return
    for name, sub in subs[0].choices.items():
        yield from _leaf_commands(sub, (*path, name))


LEAVES = list(_leaf_commands(build_parser()))


@pytest.mark.parametrize("command", LEAVES, ids=[" ".join(c) for c in LEAVES])
def test_every_command_refuses_an_unknown_option_in_one_line(command, capsys):
    """Every command (those of other packages too): a usage mistake is one line and exit status 2."""
    assert main([*command, "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kvforge: error: "), err


@pytest.mark.parametrize("command", LEAVES, ids=[" ".join(c) for c in LEAVES])
def test_every_help_shows_the_defaults(command, capsys):
    """Every option with a default says it in --help (`(default: X)` or its own words)."""
    import argparse

    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    assert main([*command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    formatter = parser._get_formatter()
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            continue
        shown = copy.copy(action)
        shown.help = formatter._get_help_string(action)
        shown = formatter._expand_help(shown)
        assert "default" in shown.lower() and str(default) in text or "default" in shown.lower(), (command, shown)
        assert action.option_strings[0] in text


def test_eval_help_lists_the_tasks(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(t in text for t in TASKS)
    assert "--max-new-tokens" in text and "(default: 5)" in text  # --samples


# -- the public API ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from kvforge.models import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))


def _bench(tiny, tmp, **kw):
    args = dict(model_name="tiny", config=None, contexts=[64], batch=1, presses=["none", "knorm"], ratios=[0.5],
                new_tokens=2, out=str(tmp / "bench"), device="cpu", model=tiny)
    return run_bench(**{**args, **kw})


def _eval(tiny, tok, tmp, **kw):
    args = dict(model_name="tiny", tasks=["facts_qa"], presses=["knorm"], ratios=[0.5], length=300, samples=1,
                out=tmp / "eval", model=tiny, tokenizer=tok, progress=False)
    return run_eval(**{**args, **kw})


# (a call of the public API given (tiny llama, its tokenizer, a GPT-2, a tmp dir), the message fragment); calls
# with `None` for the model show that the check runs before the model is touched
API_ROWS = [
    ("load_model unknown name", lambda m, t, g, d: load_model("nope"), "unknown model 'nope'"),
    ("load_model None", lambda m, t, g, d: load_model(None), "bad model None"),
    ("load_model dir without config", lambda m, t, g, d: load_model(str(d)), "has no config.json"),
    ("load_model dtype", lambda m, t, g, d: load_model("smollm2-135m", dtype="int3"), "bad dtype 'int3'"),
    ("load_model device", lambda m, t, g, d: load_model("smollm2-135m", device="tpu"), "bad device 'tpu'"),
    ("load_model random config", lambda m, t, g, d: load_model("gpt5", random_weights=True),
     "unknown random config 'gpt5'"),
    ("load_model random 8B > memory", lambda m, t, g, d: load_model("llama3.1-8b", random_weights=True),
     "random-weight 'llama3.1-8b' in float32 needs 32.1 GB (32121044992 bytes) but cpu has 16.0 GB"),
    ("load_model random-config name", lambda m, t, g, d: load_model("llama3.1-8b"), "pass random_weights=True"),
    ("get_press unknown", lambda m, t, g, d: get_press("snapkvv"), "unknown press 'snapkvv'"),
    ("get_press ratio", lambda m, t, g, d: get_press("snapkv", compression_ratio=1.5), "compression_ratio=1.5"),
    ("get_press ratio type", lambda m, t, g, d: get_press("snapkv", compression_ratio="0.5"),
     "compression_ratio='0.5'"),
    ("get_press option", lambda m, t, g, d: get_press("snapkv", windowsize=3), "no option 'windowsize'"),
    ("get_press budget", lambda m, t, g, d: get_press("knorm", budget=0), "budget=0"),
    ("get_press both", lambda m, t, g, d: get_press("knorm", compression_ratio=0.5, budget=9), "not both"),
    ("get_press inner", lambda m, t, g, d: get_press("adakv", press="h2o"), "press='h2o'"),
    ("get_press composed", lambda m, t, g, d: get_press("composed", presses=1), "composed: presses=1"),
    ("parse_press duplicate", lambda m, t, g, d: parse_press("kivi@bits=2@bits=4"), "'bits' is given twice"),
    ("parse_press duplicate inner", lambda m, t, g, d: parse_press("adakv:snapkv@press=knorm"),
     "'press' is given twice"),
    ("parse_press ratio", lambda m, t, g, d: parse_press("snapkv@compression_ratio=0.5"), "not a spec option"),
    ("parse_press empty inner", lambda m, t, g, d: parse_press("adakv:"), "names no inner press"),
    ("parse_press no wrapper", lambda m, t, g, d: parse_press("snapkv:knorm"), "snapkv wraps no press"),
    ("parse_press option", lambda m, t, g, d: parse_press("kivi@bits"), "must look like key=value"),
    ("KVCache press name", lambda m, t, g, d: KVCache(m, press="snapkv"), "press='snapkv' is not a press object"),
    ("KVCache unsupported", lambda m, t, g, d: KVCache(g, press=get_press("knorm", compression_ratio=0.5)),
     "unsupported model architecture 'gpt2'"),
    ("generate press name", lambda m, t, g, d: generate(None, None, CONTEXT, "q?", press="snapkv"),
     "press='snapkv' is not a press object; build one with kvforge.get_press('snapkv')"),
    ("generate context None", lambda m, t, g, d: generate(None, None, None, "q?"),
     "context must be a string or a list of strings; got NoneType"),
    ("generate context empty", lambda m, t, g, d: generate(None, None, "", "q?"), "context is empty"),
    ("generate context blank", lambda m, t, g, d: generate(None, None, " \n\t", "q?"), "context is empty"),
    ("generate batch blank", lambda m, t, g, d: generate(None, None, [CONTEXT, "  "], "q?"),
     "context[1] is empty or only whitespace"),
    ("generate empty batch", lambda m, t, g, d: generate(None, None, [], "q?"), "context is an empty list"),
    ("generate max_new_tokens", lambda m, t, g, d: generate(None, None, CONTEXT, "q?", max_new_tokens=0),
     "max_new_tokens=0; allowed: an integer >= 1"),
    ("generate questions None", lambda m, t, g, d: generate(None, None, CONTEXT, None), "questions must be"),
    ("generate questions int", lambda m, t, g, d: generate(None, None, CONTEXT, 5), "questions must be"),
    ("generate questions empty", lambda m, t, g, d: generate(None, None, CONTEXT, []), "questions must be"),
    ("generate too long", lambda m, t, g, d: generate(m, t, "word " * 3000, "q?"),
     "exceeds the model's maximum of 2048 tokens"),
    ("generate query-aware kvzip", lambda m, t, g, d: generate(m, t, CONTEXT, "q?", query_aware=True,
                                                               press=get_press("kvzip", compression_ratio=0.5)),
     "query_aware=True is not supported"),
    ("KVCache chunk_size 0", lambda m, t, g, d: KVCache(m, chunk_size=0), "chunk_size=0; allowed: an integer >= 1"),
    ("KVCache chunk_size bool", lambda m, t, g, d: KVCache(m, chunk_size=True), "chunk_size=True"),
    ("KVCache chunk_size float", lambda m, t, g, d: KVCache(m, chunk_size=8.0), "chunk_size=8.0"),
    ("KVCache chunk whole-context press", lambda m, t, g, d: KVCache(m, chunk_size=8, press=get_press(
        "observed_attention", compression_ratio=0.5)), "observed_attention cannot compress a prefill chunk by chunk"),
    ("generate chunk_size -1", lambda m, t, g, d: generate(None, None, CONTEXT, "q?", chunk_size=-1),
     "chunk_size=-1; allowed: an integer >= 1"),
    ("generate chunk kvzip", lambda m, t, g, d: generate(None, None, CONTEXT, "q?", chunk_size=8,
                                                         press=get_press("kvzip", compression_ratio=0.5)),
     "kvzip cannot compress a prefill chunk by chunk"),
    ("generate chunk query-aware", lambda m, t, g, d: generate(m, t, CONTEXT, "q?", chunk_size=8, query_aware=True),
     "drop chunk_size or query_aware"),
    ("run_eval chunk 0", lambda m, t, g, d: _eval(m, t, d, chunk_size=0), "chunk_size=0"),
    ("run_bench chunk 0", lambda m, t, g, d: _bench(m, d, prefill_chunks=[None, 0]), "chunk_size=0"),
    ("run_bench chunks empty", lambda m, t, g, d: _bench(m, d, prefill_chunks=[]), "prefill chunk list is empty"),
    ("run_eval samples 0", lambda m, t, g, d: _eval(m, t, d, samples=0), "samples=0"),
    ("run_eval unknown task", lambda m, t, g, d: _eval(m, t, d, tasks=["nope"]), "unknown task 'nope'"),
    ("run_eval spec at ratio", lambda m, t, g, d: _eval(m, t, d, presses=["knorm", "snapkv@budget=3"]),
     "budget is not a spec option"),
    ("run_bench context 0", lambda m, t, g, d: _bench(m, d, contexts=[0]), "context=0"),
    ("run_bench batch 0", lambda m, t, g, d: _bench(m, d, batch=0), "batch=0"),
    ("run_bench new_tokens 0", lambda m, t, g, d: _bench(m, d, new_tokens=0), "new_tokens=0"),
    ("run_bench ratio", lambda m, t, g, d: _bench(m, d, ratios=[1.5]), "ratio 1.5 is outside"),
    ("run_bench no press", lambda m, t, g, d: _bench(m, d, presses=[]), "press list is empty"),
    ("run_bench hf cache", lambda m, t, g, d: _bench(m, d, hf_caches=["dynamic@bits=2"]), "bad option"),
    ("run_bench positions", lambda m, t, g, d: _bench(m, d, contexts=[4096]),
     "--context 4096 + 10 decoded tokens exceeds the 2048 positions of the model"),
]


@pytest.mark.parametrize(("call", "fragment"), [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS])
def test_api_bad_input(call, fragment, tiny, smol_tokenizer, gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(kvforge.models, "available_memory", lambda device: GB16)
    with pytest.raises(KVForgeError) as e:
        call(tiny, smol_tokenizer, gpt2, tmp_path)
    assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)
    assert not any(tmp_path.iterdir()), "a refused call wrote files"


# -- random press specs ------------------------------------------------------------------------------------------
NAMES = sorted(PRESSES)
KEYS = sorted({f.name for cls in PRESSES.values() for f in dataclasses.fields(cls)})
VALUES = st.one_of(
    st.integers(-3, 300).map(str),
    st.sampled_from(["0", "0.5", "1.5", "-1", "1e400", "nan", "inf", "True", "False", "None", "mean", "max",
                     "snapkv", "knorm", "global", "", "2", "4", "16"]),
    st.text("ab0.-e", max_size=4),
)
PART = st.builds(
    lambda name, inner, opts: name + ("" if inner is None else f":{inner}") + "".join(f"@{k}={v}" for k, v in opts),
    st.one_of(st.sampled_from(NAMES), st.text("snapkv:", max_size=3)),
    st.one_of(st.none(), st.sampled_from([*NAMES, ""])),
    st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text("ab", max_size=2)), VALUES), max_size=3),
)
SPECS = st.one_of(st.lists(PART, min_size=1, max_size=3).map("+".join), st.text("snapkv@:+=.1", max_size=14))


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPECS, ratio=st.sampled_from([0.0, 0.25, 0.9]))
def test_random_press_specs_parse_or_raise_kvforge_error(spec, ratio):
    try:
        press = parse_press(spec)(ratio)
    except KVForgeError as e:
        assert "\n" not in str(e)
    else:
        assert press.name in PRESSES
