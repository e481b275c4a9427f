"""`kvforge …` command line. User mistakes print one line (`kvforge: error: …`) and exit with status 2."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from importlib.resources import files

from kvforge.errors import KVForgeError, read_text

EXAMPLE_QUESTIONS = [
    "Who was the first director of the Harbour Archive?",
    "Why did the logbook of the Silver Heron survive the fire?",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, `(default: X)`, unless the help already speaks of its default
    or there is none to show (None or False: the option is simply not given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS or action.required or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _format_action(self, action):
        if action.help is None and self._get_help_string(action):  # argparse shows nothing for help=None
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """The parser of `kvforge` and of every subcommand (argparse builds subparsers with the parent's class): every
    --help shows the defaults, and a usage mistake is one line, `kvforge: error: ...`, exit status 2, like every
    other user error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"kvforge: error: {message} (see `{self.prog} --help`)\n")


def _count(text: str) -> int:
    """argparse type: a whole number >= 1 (token, sample and batch counts)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}; allowed: an integer >= 1")
    return n


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _entries_summary(entries: list) -> str:
    parts = []
    for e in entries:
        parts.append(str(e) if isinstance(e, int) else "[" + ",".join(map(str, e)) + "]")
    return " ".join(parts)


def _quant_part(args) -> str | None:
    """`--quant kivi --bits 2 ...` as a spec part (`kivi@bits=2`), or None."""
    if not getattr(args, "quant", None):
        for opt in ("bits", "group_size", "residual_length"):
            if getattr(args, opt, None) is not None:
                raise KVForgeError(f"--{opt.replace('_', '-')} needs --quant (allowed: kivi, gear, kvquant)")
        return None
    from kvforge.presses.registry import PRESSES

    if args.quant not in PRESSES or PRESSES[args.quant].kind != "quantization":
        allowed = sorted(n for n, c in PRESSES.items() if c.kind == "quantization")
        raise KVForgeError(f"--quant {args.quant!r} is not a quantizer; allowed: {', '.join(allowed)}")
    opts = "".join(f"@{o}={getattr(args, o)}" for o in ("bits", "group_size", "residual_length")
                   if getattr(args, o, None) is not None)
    return args.quant + opts


def _with_quant(specs: list[str], args) -> list[str]:
    """Append the `--quant` part to every spec (`none` becomes the quantizer alone)."""
    q = _quant_part(args)
    if q is None:
        return specs
    return [q if s == "none" else f"{s}+{q}" for s in specs]


def _press_from_args(args):
    from kvforge.presses import get_press
    from kvforge.presses.registry import parse_press

    quant = _quant_part(args)
    if not args.press or args.press == "none":
        if args.compression_ratio is not None or args.budget is not None:
            raise KVForgeError("--compression-ratio/--budget need --press; allowed presses: kvforge presses")
        return None if quant is None else parse_press(quant)(0.0)
    press = _evict_press(args, get_press)
    if quant is None:
        return press
    return get_press("composed", presses=[press, parse_press(quant)(0.0)])


def _evict_press(args, get_press):
    kwargs = {}
    if args.compression_ratio is not None:
        kwargs["compression_ratio"] = args.compression_ratio
    if args.budget is not None:
        kwargs["budget"] = args.budget
    name, _, inner = args.press.partition(":")  # `adakv:knorm`: a wrapper and its inner press
    if inner:
        kwargs["press"] = inner
    return get_press(name, **kwargs)


def cmd_generate(args) -> None:
    from kvforge.cache.kvcache import check_chunking
    from kvforge.generate import generate
    from kvforge.models import load_model

    press = _press_from_args(args)  # validate before the (slow) model load
    chunk = _chunk(args.prefill_chunk)
    check_chunking(press, chunk)  # a press that cannot compress chunk by chunk: refused before the model loads
    if args.context_file:
        if not args.question:
            raise KVForgeError("--context-file needs --question (the built-in questions are about the bundled "
                               "example text, not your file)")
        context = read_text(args.context_file, "--context-file")
        if not context.strip():
            raise KVForgeError(f"--context-file {args.context_file!r} is empty or only whitespace; give the text "
                               "the questions are about")
    else:
        context = files("kvforge").joinpath("data/example_context.txt").read_text(encoding="utf-8")
    questions = args.question or EXAMPLE_QUESTIONS
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    t1 = time.perf_counter()
    answers, cache = generate(
        model, tok, context, questions, press=press, max_new_tokens=args.max_new_tokens, return_cache=True,
        cuda_graph=args.cuda_graph, chunk_size=chunk, prompt_format=args.prompt_format, compile=args.compile,
    )
    t2 = time.perf_counter()
    for q, a in zip(questions, answers):
        print(f"Q: {q}\nA: {a}\n")
    s = cache.stats()
    name = "none" if press is None else f"{press.name} {press.options()}"
    print(f"press: {name}")
    print(f"entries kept per layer: {_entries_summary(s['entries'])}")
    print(
        f"KV bytes: {_fmt_bytes(s['uncompressed_bytes'])} uncompressed -> {_fmt_bytes(s['bytes'])} stored "
        f"({s['bytes'] / max(s['uncompressed_bytes'], 1):.2f}x; buffers {_fmt_bytes(s['allocated_bytes'])})"
    )
    print(f"time: load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s")


def cmd_presses(args) -> None:
    from kvforge.presses import press_table

    rows = press_table()
    cols = ["name", "kind", "query_aware", "frees_memory", "extra_passes", "paper"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def _csv(text: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVForgeError(f"cannot read {text!r} as a comma-separated list of {cast.__name__}") from None


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _lengths(text: str, option: str) -> list[int]:
    """`2000`, `1k,2k`, `4k,32k` -> token counts, each >= 1."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            n = _length(part)
        except (ValueError, OverflowError):
            raise KVForgeError(f"{option} {text!r}: {part!r} is not a token count (e.g. 2000 or 4k)") from None
        if n < 1:
            raise KVForgeError(f"{option} {text!r}: {n} tokens; allowed: lengths >= 1")
        out.append(n)
    if not out:
        raise KVForgeError(f"{option} {text!r} gives no length (e.g. 2000 or 1k,2k)")
    return out


def _chunk(text: str | None) -> int | None:
    """`--prefill-chunk` of generate / eval: one token count (`4096`, `4k`), or None when not given."""
    if text is None:
        return None
    if "," in text:
        raise KVForgeError(f"--prefill-chunk {text!r}: give one chunk size (e.g. 4k); only bench takes a list")
    return _lengths(text, "--prefill-chunk")[0]


def _chunks(text: str | None) -> list[int | None] | None:
    """`kvforge bench --prefill-chunk none,8k`: chunk sizes to time every point with (`none` = unchunked)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise KVForgeError(f"--prefill-chunk {text!r} gives no chunk size (e.g. 8k or none,8k)")
    return [None if p.lower() == "none" else _lengths(p, "--prefill-chunk")[0] for p in parts]


def cmd_eval(args) -> None:
    from kvforge.eval.runner import format_table, run_eval, write_summary

    out = run_eval(
        args.model, _csv(args.tasks), _with_quant(_csv(args.presses), args), _csv(args.ratios, float),
        _lengths(args.length, "--length"),
        args.samples, args.out, seed=args.seed, max_new_tokens=args.max_new_tokens,
        shared_prefill=not args.no_shared_prefill, argv=sys.argv[1:], query_aware=args.query_aware,
        press_batch=args.press_batch, cuda_graph=args.cuda_graph, overwrite=args.overwrite,
        chunk_size=_chunk(args.prefill_chunk),
        prompt_format=args.prompt_format, device=args.device, dtype=args.dtype, sample_batch=args.sample_batch,
    )
    print(format_table(write_summary(out)))
    print(f"\nreport: {out / 'report.html'}")


def cmd_report(args) -> None:
    from pathlib import Path

    from kvforge.eval.report import write_report

    if not (Path(args.dir) / "results.jsonl").exists():
        raise KVForgeError(f"{args.dir!r} has no results.jsonl; give the --out directory of a `kvforge eval` run")
    print(write_report(args.dir))


def cmd_viz(args) -> None:
    from kvforge.eval.viz import attention_map

    print(attention_map(args.model, args.context_file, args.out, layers=args.layers))


def cmd_bench(args) -> None:
    from kvforge.eval.bench import run_bench

    if bool(args.random_weights) == bool(args.model):
        raise KVForgeError("give --model M, or --random-weights with --config NAME (e.g. llama3.1-8b)")
    if args.max_context or args.max_batch:
        return _bench_capacity(args)
    if args.memory_limit is not None:
        raise KVForgeError("--memory-limit bounds the searches of --max-context / --max-batch; add one of them")
    run_bench(args.model, args.config if args.random_weights else None, _lengths(args.context, "--context"),
              args.batch, _with_quant(_csv(args.presses), args), _csv(args.ratios, float), args.new_tokens, args.out,
              device=args.device, cuda_graph=not args.no_cuda_graph, hf_caches=_csv(args.hf_caches) if args.hf_caches
              else None, layouts=_csv(args.layouts) if args.layouts else None, compile=args.compile,
              overwrite=args.overwrite, prefill_chunks=_chunks(args.prefill_chunk),
              sharing=_csv(args.sharing) if args.sharing else None, sharing_warmup=args.sharing_warmup)
    print(f"results: {args.out}/bench.json, bench.csv, bench.png")


def _bench_capacity(args) -> None:
    """`kvforge bench --max-context | --max-batch`: the capacity search (kvforge.eval.capacity)."""
    from kvforge.eval.capacity import run_capacity
    from kvforge.models import load_model
    from kvforge.presses.registry import parse_press

    if args.max_context and args.max_batch:
        raise KVForgeError("--max-context and --max-batch are two searches; give one of them")
    if args.memory_limit is not None and not args.memory_limit > 0:
        raise KVForgeError(f"--memory-limit {args.memory_limit}: allowed: a number of GB > 0")
    presses, ratios, chunks = _with_quant(_csv(args.presses), args), _csv(args.ratios, float), _chunks(
        args.prefill_chunk)
    contexts = _lengths(args.context, "--context")
    limit = None if args.search_limit is None else _lengths(args.search_limit, "--search-limit")[0]
    for spec in presses:  # every spec parses before the model loads
        if spec != "none":
            parse_press(spec)
    model, _ = load_model(args.config if args.random_weights else args.model, random_weights=bool(args.random_weights),
                          device=args.device or "auto")
    what = "context" if args.max_context else "batch"
    run_capacity(model, presses, ratios, args.out, what=what, prefill_chunks=chunks, batch=args.batch,
                 contexts=contexts, memory_limit_gb=args.memory_limit, step=args.search_step, limit=limit,
                 sharing=_csv(args.sharing) if args.sharing else None, sharing_warmup=args.sharing_warmup)
    print(f"results: {args.out}/capacity.json, capacity.csv")


def cmd_demo(args) -> None:
    from kvforge.eval.demo import run_demo

    run_demo(args.out, model_name=args.model, samples=args.samples, overwrite=args.overwrite)


def _writable_file(path: str, option: str) -> None:
    """`path` can be written: its folder exists (or can be made) and is writable, and it is not a folder."""
    import os
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise KVForgeError(f"{option} {path!r} is a directory; give a file name")
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise KVForgeError(f"{option} {path!r} cannot be written ({str(parent)!r} is not a writable directory)")


def cmd_kvzip_head_scores(args) -> None:
    from kvforge.calibrate.kvzip import compute_head_scores, save_head_scores
    from kvforge.models import load_model

    _writable_file(args.out, "--out")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    scores = compute_head_scores(model, tok, args.length, args.samples, args.seed, progress=True)
    path = save_head_scores(args.out, scores, model=args.model, task="facts_qa", length=args.length,
                            samples=args.samples, seed=args.seed)
    print(f"head scores {list(scores.shape)} -> {path}")


def cmd_headkv_scores(args) -> None:
    from kvforge.calibrate.headkv import write_head_scores
    from kvforge.eval.tasks import TASKS
    from kvforge.models import load_model

    if args.task not in TASKS:
        raise KVForgeError(f"unknown task {args.task!r}; allowed: {', '.join(TASKS)}")
    _writable_file(args.out, "--out")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    res = write_head_scores(model, tok, args.out, args.model, args.task, args.length, args.samples, args.seed)
    print(f"head scores {len(res['scores'])}x{len(res['scores'][0])} -> {args.out}")


def _quant_args(parser) -> None:
    parser.add_argument("--quant", default=None, help="quantize what the press keeps: kivi | gear | kvquant")
    parser.add_argument("--bits", type=int, default=None, help="bits per quantized element: 2 | 4 | 8")
    parser.add_argument("--group-size", type=int, default=None, help="tokens per key quantization group")
    parser.add_argument("--residual-length", type=int, default=None, help="newest tokens kept in full precision")


def _prompt_format_arg(parser) -> None:
    from kvforge.prompt import DEFAULT_PROMPT_FORMAT, PROMPT_FORMATS

    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=DEFAULT_PROMPT_FORMAT,
                        help="kvpress: token for token kvpress 0.5.5's pipeline (default); kvforge: kvforge's earlier "
                             "format (context right-stripped, the question after a blank line)")


def build_parser() -> argparse.ArgumentParser:
    from kvforge.eval.tasks import TASKS

    p = Parser(prog="kvforge", description="KV-cache compression for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="compress a context once and answer questions from it")
    g.add_argument("--model", default="smollm2-135m", help="alias, HF id, local dir or .gguf (default smollm2-135m)")
    g.add_argument("--press", default=None,
                   help="press name (see `kvforge presses`), wrapper:inner (e.g. adakv:knorm), or none")
    g.add_argument("--compression-ratio", type=float, default=None, help="fraction of context entries removed")
    g.add_argument("--budget", type=int, default=None, help="entries kept per layer (instead of a ratio)")
    g.add_argument("--context-file", default=None, help="text file with the context (default: a bundled example)")
    g.add_argument("--question", action="append", help="a question (repeat for several)")
    g.add_argument("--max-new-tokens", type=_count, default=64, help="answer length cap, in tokens")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    g.add_argument("--device", default=None, help="cpu | cuda | auto")
    g.add_argument("--cuda-graph", action="store_true",
                   help="decode by replaying one captured step per token (fast on CUDA; bf16 rounding may differ "
                        "from plain generate)")
    g.add_argument("--compile", default="auto", choices=["auto", "off", "on", "max-autotune"],
                   help="with --cuda-graph: torch.compile the captured step; 'auto' (default) is max-autotune on "
                        "CUDA, its tuning cached in $KVFORGE_CACHE/inductor (minutes the first time for a model's "
                        "shapes), off elsewhere")
    g.add_argument("--prefill-chunk", default=None,
                   help="prefill the context this many tokens at a time (e.g. 4k), compressing as it goes: memory "
                        "is the weights, the kept KV and one chunk")
    _prompt_format_arg(g)
    _quant_args(g)
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("presses", help="list the registered presses")
    pr.set_defaults(func=cmd_presses)

    e = sub.add_parser("eval", help="sweep presses × ratios over generated benchmarks, one prefill per sample")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--tasks", required=True, help=f"comma-separated task names: {', '.join(TASKS)}")
    e.add_argument("--presses", required=True,
                   help="comma-separated presses; wrappers as adakv:knorm, options as kivi@bits=4, compose with +")
    e.add_argument("--ratios", default="0.25,0.5,0.75", help="comma-separated compression ratios")
    e.add_argument("--length", default="2000", help="context length(s) in model tokens, e.g. 2000 or 1k,2k")
    e.add_argument("--samples", type=_count, default=5, help="samples per task and length")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    e.add_argument("--max-new-tokens", type=_count, default=None, help="cap on answer length (default: per task)")
    e.add_argument("--no-shared-prefill", action="store_true", help="prefill again for every press (slow)")
    e.add_argument("--press-batch", type=_count, default=8,
                   help="answer this many (press, ratio) forks of a prefill as one batch (1 = one at a time)")
    e.add_argument("--sample-batch", type=_count, default=1,
                   help="prefill and answer this many samples of a task as one left-padded batch (same answers; "
                        "on a GPU, a small model needs 16-64 to stop being launch-bound)")
    e.add_argument("--query-aware", action="store_true",
                   help="compress context + question together, one prefill per question (SnapKV's setting)")
    e.add_argument("--cuda-graph", action="store_true",
                   help="decode answers by replaying one captured step per token (GPU: small models stop being "
                        "launch-bound)")
    e.add_argument("--device", default=None, help="cpu | cuda | auto (default: cpu)")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 "
                                                 "on CUDA)")
    e.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    e.add_argument("--overwrite", action="store_true",
                   help="start clean in --out (its results are deleted) instead of resuming; needed when --out holds "
                        "a run made with other settings")
    e.add_argument("--prefill-chunk", default=None,
                   help="prefill the context this many tokens at a time (e.g. 4k), compressing as it goes: "
                        "every press prefills on its own (no shared prefill)")
    _prompt_format_arg(e)
    _quant_args(e)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="rebuild report.html and the PNGs of an eval directory")
    r.add_argument("dir")
    r.set_defaults(func=cmd_report)

    v = sub.add_parser("viz", help="visualisations")
    vsub = v.add_subparsers(dest="what", required=True)
    va = vsub.add_parser("attention", help="attention map of a prompt (averaged over heads) as a PNG")
    va.add_argument("--model", default="smollm2-135m")
    va.add_argument("--context-file", required=True)
    va.add_argument("--out", default="attention.png")
    va.add_argument("--layers", default=None, help="comma-separated layer indices (default: 4 spread layers)")
    va.set_defaults(func=cmd_viz)

    b = sub.add_parser("bench", help="decode speed, memory and bandwidth per press and ratio")
    b.add_argument("--model", default=None, help="a model to load (or use --random-weights --config)")
    b.add_argument("--random-weights", action="store_true", help="random weights with a named config's shapes")
    b.add_argument("--config", default="llama3.1-8b", help="named config for --random-weights")
    b.add_argument("--context", default="4k,32k", help="context lengths, e.g. 4k,32k,128k")
    b.add_argument("--batch", type=_count, default=1, help="sequences decoded together")
    b.add_argument("--presses", default="none,knorm,adakv:knorm", help="comma-separated; 'none' = no press")
    b.add_argument("--ratios", default="0.75", help="comma-separated compression ratios")
    b.add_argument("--new-tokens", type=_count, default=32, help="decode steps timed per row")
    b.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    b.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly instead of replaying a CUDA graph")
    b.add_argument("--out", default="runs/bench",
                   help="results folder; a run stopped midway resumes there (rows of the same set-up are kept, "
                        "not re-timed); another set-up there is refused unless --overwrite")
    b.add_argument("--overwrite", action="store_true",
                   help="start clean in --out (its rows are deleted) instead of resuming")
    b.add_argument("--sharing", default=None,
                   help="cross-layer KV sharing presets timed next to the dense model (random weights, Llama family):"
                        " comma-separated lckv, cla, yoco, mixattention")
    b.add_argument("--sharing-warmup", type=int, default=2, help="lckv warm-up layers for --sharing (default: 2)")
    b.add_argument("--hf-caches", default=None,
                   help="also time plain transformers decoding with these caches: dynamic, quanto@bits=2, ...")
    b.add_argument("--compile", nargs="?", const="on", default="auto",
                   choices=["auto", "off", "on", "both", "autotune", "max-autotune"],
                   help="torch.compile the captured decode step (fuses the model's small kernels); 'auto' (default) "
                        "is max-autotune on CUDA (its tuning cached on disk, $KVFORGE_CACHE/inductor) and off "
                        "elsewhere, or what KVFORGE_COMPILE says; 'both' times "
                        "every row without and with, in the same run; 'autotune' times default and max-autotune "
                        "compilation (inductor-tuned GEMMs), 'max-autotune' only the latter; the variants of a "
                        "row share its prefill")
    b.add_argument("--layouts", default=None,
                   help="per-head-budget presses on these layouts too: packed,padded (default: the device's own)")
    b.add_argument("--prefill-chunk", default=None,
                   help="prefill chunk sizes to time every row with, e.g. 8k or none,8k (none = unchunked, the "
                        "default); a press compresses every chunk as it comes")
    b.add_argument("--max-context", action="store_true",
                   help="instead of timing: the longest context that fits in memory per press, ratio and chunk size, "
                        "next to none (exponential then binary search; out of memory = too long)")
    b.add_argument("--max-batch", action="store_true",
                   help="instead of timing: the largest batch that fits at each --context, per press, ratio and chunk")
    b.add_argument("--memory-limit", type=float, default=None,
                   help="with --max-context/--max-batch: a peak above this many GB counts as out of memory "
                        "(on CUDA the allocator is capped there during the search: a GPU of that size)")
    b.add_argument("--search-step", type=_count, default=1024, help="context granularity of --max-context (tokens)")
    b.add_argument("--search-limit", default=None,
                   help="largest size --max-context / --max-batch tries (tokens, e.g. 512k, or rows; default: the "
                        "model's positions, 4096 rows); random weights may go past the positions")
    _quant_args(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the main job of `make demo`: a compact eval sweep on the embedded model")
    d.add_argument("--model", default="smollm2-135m", help="alias, HF id, local dir or .gguf")
    d.add_argument("--out", default="runs/demo", help="output directory (re-run to resume)")
    d.add_argument("--samples", type=_count, default=None, help="samples per task (default: the demo's own)")
    d.add_argument("--overwrite", action="store_true", help="start clean in --out instead of resuming")
    d.set_defaults(func=cmd_demo)

    kz = sub.add_parser("kvzip-head-scores", help="offline KVzip head scores [L, H_kv] for kvzip(level='head')")
    kz.add_argument("--model", default="smollm2-135m")
    kz.add_argument("--out", required=True, help="JSON file to write (kvzip's head_scores_path)")
    kz.add_argument("--length", type=_count, default=1000, help="calibration context length in tokens")
    kz.add_argument("--samples", type=_count, default=4, help="calibration contexts (facts_qa)")
    kz.add_argument("--seed", type=int, default=0)
    kz.add_argument("--dtype", default=None)
    kz.add_argument("--device", default=None)
    kz.set_defaults(func=cmd_kvzip_head_scores)

    hk = sub.add_parser("headkv-scores", help="offline head-importance scores [L, H_kv] for headkv(scores_path=...)")
    hk.add_argument("--model", default="smollm2-135m")
    hk.add_argument("--out", required=True, help="JSON file to write (headkv's scores_path)")
    hk.add_argument("--task", default="niah_single_1", help="calibration task (answers must appear in the context)")
    hk.add_argument("--length", type=_count, default=1000, help="calibration context length in tokens")
    hk.add_argument("--samples", type=_count, default=4, help="calibration samples")
    hk.add_argument("--seed", type=int, default=0)
    hk.add_argument("--dtype", default=None)
    hk.add_argument("--device", default=None)
    hk.set_defaults(func=cmd_headkv_scores)

    from kvforge.sharing.cli import add_parsers as add_sharing_parsers  # convert lckv, train lckv

    add_sharing_parsers(sub)  # `train`/`convert` groups: kvforge.sharing.cli.command_group(sub, name, help)

    from kvforge.streaming.cli import add_parsers as add_streaming_parsers  # ppl, stream, train kv-align|gpt2

    add_streaming_parsers(sub)

    from kvforge.link.cli import add_parsers as add_link_parsers  # train kvlink, link eval

    add_link_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage mistake (2, already printed as one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        args.func(args)
    except KVForgeError as e:
        print(f"kvforge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
