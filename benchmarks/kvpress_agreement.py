"""kvforge against kvpress 0.5.5 on identical prompts: per press, both scores (95% intervals) and answer agreement.

Same model weights, same generated samples, same token ids (kvforge's `kvpress` prompt format, which is
kvpress's `KVPressTextGenerationPipeline.preprocess` token for token), greedy answers, one compression of the
context per sample answering all its questions, for the presses both libraries have:
none (the uncompressed control: both should agree on every answer), knorm, snapkv, tova, streamingllm,
expected_attention, observed_attention, pyramidkv, adakv (over SnapKV), kvzip, and random (a control: the two
libraries draw different random entries, so low agreement there is expected). Where defaults differ, kvforge is
given kvpress's (SnapKV/PyramidKV window 64, kernel 5).

kvpress needs transformers < 5.3 and kvforge runs on 5.23, so kvpress runs in a child process whose
PYTHONPATH puts a separate target directory first. Install it once, with kvforge's own pip (the target gets
transformers 5.2.0 and its dependencies — huggingface_hub 1.x, tokenizers 0.22, httpx, ...; torch, accelerate and
safetensors come from kvforge's environment, since transformers does not require them):

    .venv/bin/pip install --target /tmp/kvp --no-deps kvpress==0.5.5
    .venv/bin/pip install --target /tmp/kvp transformers==5.2.0 "cachetools>=5.5.2,<6" "fire>=0.6,<0.7"

(pip then warns that kvforge wants transformers 5.23: that concerns the target only; kvforge's environment is
unchanged. `datasets`, imported by two kvpress presses not used here, is stubbed in the child.) Then:

    .venv/bin/python benchmarks/kvpress_agreement.py --kvpress-path /tmp/kvp --out runs/kvpress_agreement \
        [--model smollm2-135m] [--task niah_single_1] [--length 2000] [--samples 50] [--ratio 0.5] \
        [--presses knorm,snapkv,...] [--device cuda]

Writes to `--out`: `kvforge.jsonl` and `kvpress.jsonl` (one line per press and sample: the answers; re-running
the same command resumes both), `samples.jsonl` (the prompts' parts), and `agreement.csv` / `agreement.json`:
per press, n questions, each library's mean score with its Wilson/bootstrap 95% interval, and `same_answer` = the
share of questions where both gave the same answer (after stripping whitespace), and `error`: the first failure of
a press in either library (its samples are left out of n; the other presses go on).

CPU smoke run (2026-12-05, smollm2-135m fp32, niah_single_1 at 400 tokens, 2 samples, ratio 0.5; tiny n, so it
shows the script works, not how often the libraries agree): every press ran in both libraries and gave the same
answers on both samples except `random` (0/2, as expected) and `pyramidkv`, which kvpress 0.5.5 could not run
here: "RuntimeError: The size of tensor a (388) must match the size of tensor b (398) at non-singleton dimension 3"
in transformers' SDPA when the question is fed (kvforge's run of it went through).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

# press -> (kvforge constructor, kvpress constructor); both take the compression ratio r (fraction removed)
PRESSES = {
    "none": ("None", "None"),
    "knorm": ("get_press('knorm', compression_ratio=r)", "KnormPress(compression_ratio=r)"),
    "snapkv": ("get_press('snapkv', compression_ratio=r, window_size=64, kernel_size=5)",
               "SnapKVPress(compression_ratio=r)"),
    "tova": ("get_press('tova', compression_ratio=r)", "TOVAPress(compression_ratio=r)"),
    "streamingllm": ("get_press('streamingllm', compression_ratio=r)", "StreamingLLMPress(compression_ratio=r)"),
    "expected_attention": ("get_press('expected_attention', compression_ratio=r)",
                           "ExpectedAttentionPress(compression_ratio=r)"),
    "observed_attention": ("get_press('observed_attention', compression_ratio=r)",
                           "ObservedAttentionPress(compression_ratio=r)"),
    "pyramidkv": ("get_press('pyramidkv', compression_ratio=r, window_size=64, kernel_size=5)",
                  "PyramidKVPress(compression_ratio=r)"),
    "adakv": ("get_press('adakv', compression_ratio=r, press=get_press('snapkv', window_size=64, kernel_size=5))",
              "AdaKVPress(press=SnapKVPress(compression_ratio=r))"),
    "kvzip": ("get_press('kvzip', compression_ratio=r)", "KVzipPress(compression_ratio=r)"),
    "random": ("get_press('random', compression_ratio=r)", "RandomPress(compression_ratio=r, seed=0)"),
}


def read_jsonl(path: Path) -> dict[tuple[str, str], dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interrupt: redone
                continue
            done[(r["press"], r["sample_id"])] = r
    return done


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
# kvpress side (child process: transformers < 5.3 from --kvpress-path, no kvforge import)
# ------------------------------------------------------------------------------------------------------------
def kvpress_child(args) -> None:
    import importlib.machinery
    import types

    try:  # imported at module level by two kvpress presses not used here
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
        stub.load_dataset = None
        sys.modules["datasets"] = stub
    import kvpress
    import torch
    import transformers
    from kvpress import (  # noqa: F401  (named in PRESSES)
        AdaKVPress,
        ExpectedAttentionPress,
        KnormPress,
        KVzipPress,
        ObservedAttentionPress,
        PyramidKVPress,
        RandomPress,
        SnapKVPress,
        StreamingLLMPress,
        TOVAPress,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    print(f"kvpress {getattr(kvpress, '__version__', '?')} from {kvpress.__file__}, transformers "
          f"{transformers.__version__}", file=sys.stderr)
    out = Path(args.out)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    sink_path = out / "kvpress.jsonl"
    done = read_jsonl(sink_path)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    device = args.device or "cpu"
    models = {}
    with sink_path.open("a", encoding="utf-8") as sink:
        for press_name in args.presses.split(","):
            attn = "eager" if press_name == "observed_attention" else "sdpa"
            if attn not in models:
                models[attn] = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                                    attn_implementation=attn).to(device).eval()
            pipe = pipeline("kv-press-text-generation", model=models[attn], tokenizer=tok, device=device)
            for s in samples:
                if (press_name, s["sample_id"]) in done:
                    continue
                try:
                    press = eval(PRESSES[press_name][1], globals() | locals(), {"r": args.ratio})  # noqa: S307
                    with torch.inference_mode():
                        res = pipe(s["context"], questions=s["questions"], answer_prefix=s["answer_prefix"],
                                   press=press, max_new_tokens=s["max_new_tokens"])
                    row = {"answers": [a.strip() for a in res["answers"]]}
                except Exception as e:  # a press kvpress can't run here: recorded, the others go on
                    row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                sink.write(json.dumps({"press": press_name, "sample_id": s["sample_id"], **row}) + "\n")
                sink.flush()
                print(f"kvpress {press_name} {s['sample_id']}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------
# kvforge side and the comparison
# ------------------------------------------------------------------------------------------------------------
def run_kvforge(args, model, tok, samples, out: Path) -> None:
    from kvforge import generate, get_press  # noqa: F401  (named in PRESSES)

    sink_path = out / "kvforge.jsonl"
    done = read_jsonl(sink_path)
    with sink_path.open("a", encoding="utf-8") as sink:
        for press_name in args.presses.split(","):
            for s in samples:
                if (press_name, s.id) in done:
                    continue
                try:
                    press = eval(PRESSES[press_name][0], {"get_press": get_press}, {"r": args.ratio})  # noqa: S307
                    row = {"answers": generate(model, tok, s.context, s.questions, press=press,
                                               answer_prefix=s.answer_prefix, prompt_format="kvpress",
                                               max_new_tokens=args.max_new_tokens or s.max_new_tokens)}
                except Exception as e:  # recorded like kvpress's failures, the others go on
                    row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                sink.write(json.dumps({"press": press_name, "sample_id": s.id, **row}) + "\n")
                sink.flush()
                print(f"kvforge {press_name} {s.id}", file=sys.stderr)


def compare(args, samples, out: Path) -> list[dict]:
    from kvforge.eval.intervals import mean_interval
    from kvforge.eval.metrics import score

    ours, theirs = read_jsonl(out / "kvforge.jsonl"), read_jsonl(out / "kvpress.jsonl")
    rows = []
    for press_name in args.presses.split(","):
        a_scores, b_scores, same, errors = [], [], [], []
        for s in samples:
            a, b = ours.get((press_name, s.id)), theirs.get((press_name, s.id))
            if a is None or b is None:
                continue
            errors += [f"{lib}: {r['error']}" for lib, r in (("kvforge", a), ("kvpress", b)) if "error" in r]
            if "error" in a or "error" in b:
                continue
            for golds, x, y in zip(s.answers, a["answers"], b["answers"]):
                a_scores.append(score(s.metric, x, golds))
                b_scores.append(score(s.metric, y, golds))
                same.append(float(x.strip() == y.strip()))
        n = len(same)
        row = {"press": press_name, "compression_ratio": 0.0 if press_name == "none" else args.ratio, "n": n}
        for lib, xs in (("kvforge", a_scores), ("kvpress", b_scores)):
            ci = mean_interval(xs, seed=f"{lib}|{press_name}")
            row[f"{lib}_score"] = round(sum(xs) / n, 4) if n else None
            row[f"{lib}_ci_low"], row[f"{lib}_ci_high"] = (None, None) if ci is None else map(lambda v: round(v, 4), ci)
        row["same_answer"] = round(sum(same) / n, 4) if n else None
        ci = mean_interval(same, seed=f"same|{press_name}")
        row["same_ci_low"], row["same_ci_high"] = (None, None) if ci is None else map(lambda v: round(v, 4), ci)
        row["error"] = errors[0] if errors else None  # the first failure; its samples are left out of n
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/kvpress_agreement")
    ap.add_argument("--kvpress-path", default="/tmp/kvp", help="pip --target directory holding kvpress 0.5.5")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="niah_single_1")
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's own")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kvpress_child(args)
        return
    presses = args.presses.split(",")
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        sys.exit(f"unknown press {unknown[0]!r}; allowed: {', '.join(PRESSES)}")
    if "none" not in presses:
        args.presses = ",".join(["none", *presses])
    if not (Path(args.kvpress_path) / "kvpress").is_dir():
        sys.exit(f"no kvpress in {args.kvpress_path!r}; install it as this script's docstring says")

    from kvforge import load_model
    from kvforge.eval.tasks import make_samples

    model, tok = load_model(args.model, device=args.device)
    model_dir = model.config._name_or_path  # the local safetensors directory both libraries load
    samples = make_samples(args.task, tok, args.length, args.samples, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "task", "length", "samples", "seed", "ratio", "max_new_tokens")}
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text())["settings"] != settings:
        sys.exit(f"{str(out)!r} holds a run with other settings ({meta_path}); choose another --out")
    write_atomic(out / "samples.jsonl", "".join(json.dumps({
        "sample_id": s.id, "context": s.context, "questions": s.questions, "answer_prefix": s.answer_prefix,
        "max_new_tokens": args.max_new_tokens or s.max_new_tokens}) + "\n" for s in samples))
    write_atomic(meta_path, json.dumps({"settings": settings, "model_dir": str(model_dir)}, indent=2))

    run_kvforge(args, model, tok, samples, out)
    del model
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.kvpress_path, *filter(None, [os.environ.get(
        "PYTHONPATH")])]))
    cmd = [sys.executable, __file__, "--child", "--out", str(out), "--model-dir", str(model_dir), "--presses",
           args.presses, "--ratio", str(args.ratio)] + (["--device", args.device] if args.device else [])
    subprocess.run(cmd, env=env, check=True)

    rows = compare(args, samples, out)
    cols = list(rows[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows({c: "" if r[c] is None else r[c] for c in cols} for r in rows)
    write_atomic(out / "agreement.csv", buf.getvalue())
    write_atomic(out / "agreement.json", json.dumps({"settings": settings, "rows": rows}, indent=2))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
