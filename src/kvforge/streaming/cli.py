"""`kvforge ppl`, `kvforge stream`, `kvforge train kv-align`, `kvforge train gpt2`: the streaming commands.

`add_parsers(subparsers)` is called by `kvforge.cli.build_parser`. Heavy imports happen inside the commands, and
every argument is checked before a model loads (bad input: one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys

from kvforge.errors import KVForgeError
from kvforge.sharing.cli import command_group

MODE_NAMES = ("full", "sw", "ar", "kv", "window")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVForgeError(f"cannot read {text!r} as comma-separated integers") from None


def _floats(text: str) -> list[float]:
    """--alphas: comma-separated strengths >= 0; [] when only 1 (or nothing) is given: no calibration."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVForgeError(f"--alphas {text!r}: allowed: comma-separated numbers >= 0, e.g. 0,0.5,1") from None
    if any(not v >= 0 for v in values):
        raise KVForgeError(f"--alphas {text!r}: allowed: comma-separated numbers >= 0, e.g. 0,0.5,1")
    return [] if set(values) <= {1.0} else values


def _check_mode(mode: str, cache_size: int, sinks: int, kv_align: str | None) -> None:
    """The checks that need no model: mode name, cache size against the sinks, networks for `kv`."""
    if mode not in MODE_NAMES:
        raise KVForgeError(f"unknown mode {mode!r}; allowed: {', '.join(MODE_NAMES)}")
    n_sink = sinks if mode in ("sw", "kv") else 0
    if mode != "full" and cache_size <= n_sink:
        raise KVForgeError(f"cache size {cache_size} is not larger than the {n_sink} sinks; allowed: a cache size "
                           f"> {n_sink}")
    if mode == "kv" and not kv_align:
        raise KVForgeError("mode kv needs KV-Align networks: --kv-align DIR (train them with `kvforge train "
                           "kv-align`)")


def _meta(args, model) -> dict:
    from kvforge.eval.runs import device_name, git_commit, versions

    return {"argv": sys.argv[1:], "model": args.model, "commit": git_commit(), "device": device_name(model),
            "dtype": str(next(model.parameters()).dtype), **versions()}


def _nets(args):
    """The networks of --kv-align (read before the model loads, so a wrong folder fails at once), or None."""
    if not args.kv_align:
        return None
    from kvforge.streaming.kvalign import KVAlign

    return KVAlign.load(args.kv_align)


def _fit(nets, model):
    if nets is not None:
        nets.check_model(model)
        nets.to(model.device)
    return nets


def cmd_ppl(args) -> None:
    from kvforge.streaming.data import read_text
    from kvforge.streaming.load import load_stream_model
    from kvforge.streaming.ppl import run_ppl

    modes, sizes = [m.strip() for m in args.modes.split(",") if m.strip()], _ints(args.cache_sizes)
    for mode in modes:
        for size in sizes:
            _check_mode(mode, size, args.sinks, args.kv_align)
    if args.tokens < 1 or args.rows < 1 or args.tokens % args.rows:
        raise KVForgeError(f"--tokens {args.tokens} --rows {args.rows}; allowed: tokens ≥ 1, rows dividing tokens")
    text, nets = read_text(args.text_file), _nets(args)
    model, tok = load_stream_model(args.model, dtype=args.dtype, device=args.device)
    nets = _fit(nets, model)
    run_ppl(model, tok, text, args.tokens, modes, sizes, args.sinks, args.out, nets=nets,
            meta={**_meta(args, model), "text": args.text_file, "kv_align": args.kv_align}, rows=args.rows,
            cuda_graph=args.cuda_graph, bits=args.kv_bits)
    print(f"results: {args.out}/ppl.csv, ppl.png")


def cmd_stream(args) -> None:
    from pathlib import Path

    from kvforge.eval.runs import prepare_out
    from kvforge.streaming import generate
    from kvforge.streaming.generate import compare_ar, run_stream, write_latency, write_latency_csv
    from kvforge.streaming.load import load_stream_model
    from kvforge.streaming.modes import make_mode

    _check_mode(args.mode, args.cache_size, args.sinks, args.kv_align)
    if args.mode == "full":
        raise KVForgeError("mode full has no fixed cache; allowed for stream: sw, ar, kv, window")
    if args.num_tokens < 1:
        raise KVForgeError(f"--num-tokens {args.num_tokens}; allowed: ≥ 1")
    out, nets = prepare_out(args.out) if args.out else None, _nets(args)
    model, tok = load_stream_model(args.model, dtype=args.dtype, device=args.device)
    mode = make_mode(args.mode, args.cache_size, args.sinks, _fit(nets, model), bits=args.kv_bits)
    emit = None if args.quiet else (lambda s: print(s, end="", flush=True))
    if emit:
        print(args.prompt, end="", flush=True)
    records: list = []

    def on_block(recs: list) -> None:  # a stopped run keeps its finished blocks; --quiet still shows progress
        if out:
            write_latency_csv(Path(out), recs)
        if args.quiet and recs[-1]["tokens"] % generate.PROGRESS == 0:
            print(f"{recs[-1]['tokens']}/{args.num_tokens} tokens, {recs[-1]['ms_per_token']} ms/token",
                  file=sys.stderr, flush=True)

    summary = run_stream(model, tok, mode, args.prompt, args.num_tokens, emit=emit, top_k=args.top_k,
                         seed=args.seed, records=records, cuda_graph=args.cuda_graph, on_block=on_block)
    if out:  # the stream is kept even if the comparison below fails
        write_latency(Path(out), records, summary, _meta(args, model))
    if args.compare_ar:
        ar = compare_ar(model, tok, args.prompt, args.cache_size, args.compare_ar, args.top_k, args.seed)
        summary["ar"] = ar
        summary["speedup_vs_ar"] = round(summary["tokens_per_s"] / ar["tokens_per_s"], 2)
    print(f"\n\n{summary['tokens']} tokens, {summary['tokens_per_s']} tokens/s ({summary['ms_per_token']} ms/token), "
          f"peak memory {summary['peak_memory_bytes'] / 2**20:.1f} MiB, cache {summary['cache_bytes'] / 2**20:.2f} MiB"
          + (f"; ar {summary['ar']['ms_per_token']} ms/token, {args.mode} is {summary['speedup_vs_ar']}x faster"
             if args.compare_ar else ""))
    if out:
        write_latency(Path(out), records, summary, _meta(args, model))
        print(f"results: {out}/latency.csv, summary.json")


def cmd_train_kv_align(args) -> None:
    from kvforge.streaming.data import read_text
    from kvforge.streaming.load import load_stream_model
    from kvforge.streaming.train import TrainConfig, train_kv_align

    sizes = _ints(args.cache_sizes)
    for size in sizes:
        _check_mode("sw", size, args.sinks, None)
    for flag, value, least in (("--lm-steps", args.lm_steps, 0), ("--lm-rows", args.lm_rows, 1),
                               ("--lm-eval-every", args.lm_eval_every, 1)):
        if value < least:
            raise KVForgeError(f"{flag} {value}; allowed: an integer ≥ {least}")
    cfg = TrainConfig(cache_sizes=sizes, n_sink=args.sinks, streams=args.streams, snapshots=args.snapshots,
                      per_snapshot=args.per_snapshot,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      num_pos=args.num_pos, key_hidden=_ints(args.key_hidden), value_hidden=_ints(args.value_hidden),
                      cuda_graph=args.cuda_graph, alphas=_floats(args.alphas), calib_tokens=args.calib_tokens,
                      lm_steps=args.lm_steps, lm_rows=args.lm_rows, lm_lr=args.lm_lr,
                      lm_eval_every=args.lm_eval_every)
    text = read_text(args.text_file)
    model, tok = load_stream_model(args.model, dtype=args.dtype, device=args.device)
    nets = train_kv_align(model, tok, text, args.out, cfg, meta=_meta(args, model))
    print(f"KV-Align networks -> {args.out} (validation loss {nets.spec.trained['val_loss'][-1]:.4g}, "
          f"identity {nets.spec.trained['val_identity']:.4g}; strength per cache size {nets.spec.strength or 1.0})")


def cmd_train_gpt2(args) -> None:
    from kvforge.streaming.data import read_text
    from kvforge.streaming.gpt2 import GPT2Train, train_gpt2

    cfg = GPT2Train(layers=args.layers, dim=args.dim, heads=args.heads, positions=args.positions,
                    seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr, seed=args.seed)
    text = read_text(args.text_file)
    train_gpt2(text, args.out, cfg, device=args.device, heldout=read_text(args.heldout) if args.heldout else None)
    print(f"GPT-2 model -> {args.out}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, HF dir (a `kvforge train gpt2` dir too), .gguf")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | auto")


def _cache_args(p: argparse.ArgumentParser) -> None:
    """How the sw/window/kv caches are stored and stepped (ar keeps none)."""
    p.add_argument("--kv-bits", type=int, default=16, choices=(16, 8, 4, 2),
                   help="store the sw/window/kv cache entries quantized to this many bits (16: as computed)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="once a cache is full, replay one captured CUDA graph per token (same numbers, no launch "
                        "overhead)")


def add_parsers(sub) -> None:
    """Add `ppl`, `stream` and `train` to the `kvforge` subcommands."""
    p = sub.add_parser("ppl", help="long-text perplexity through a fixed-size cache, per mode and cache size")
    _model_args(p)
    p.add_argument("--text-file", required=True, help="a UTF-8 text file, or shakespeare:heldout / shakespeare:train")
    p.add_argument("--tokens", type=int, default=20000, help="predictions scored (the text needs one token more)")
    p.add_argument("--modes", default="full,sw,ar,window", help=f"comma-separated: {', '.join(MODE_NAMES)}")
    p.add_argument("--cache-sizes", default="32,64,128,256,1024", help="comma-separated cache sizes (entries)")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens for sw and kv")
    p.add_argument("--kv-align", default=None, help="KV-Align networks (a `kvforge train kv-align` dir) for kv")
    p.add_argument("--rows", type=int, default=1,
                   help="stream this many consecutive segments of the text side by side (a batch: faster on GPU)")
    _cache_args(p)
    p.add_argument("--out", required=True, help="folder for ppl.csv, ppl.png, run_meta.json (re-run to resume)")
    p.set_defaults(func=cmd_ppl)

    s = sub.add_parser("stream", help="endless generation from a fixed-size cache")
    _model_args(s)
    s.add_argument("--mode", default="sw", help="sw | ar | kv | window")
    s.add_argument("--cache-size", type=int, default=1024)
    s.add_argument("--sinks", type=int, default=4)
    s.add_argument("--num-tokens", type=int, default=1000)
    s.add_argument("--prompt", default="Once upon a time", help="text to start from")
    s.add_argument("--kv-align", default=None, help="KV-Align networks for --mode kv")
    s.add_argument("--top-k", type=int, default=None, help="sample from the top k (default: greedy)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--compare-ar", type=int, default=0, metavar="T",
                   help="then generate T tokens with ar on the same prompt and report the speed ratio")
    s.add_argument("--quiet", action="store_true", help="do not print the generated text")
    _cache_args(s)
    s.add_argument("--out", default=None, help="folder for latency.csv (per 1k tokens), summary.json")
    s.set_defaults(func=cmd_stream)

    tsub = command_group(sub, "train", "train or fine-tune models")
    k = tsub.add_parser("kv-align", help="KV-Align key/value networks for a model")
    _model_args(k)
    k.add_argument("--text-file", required=True, help="training text (e.g. shakespeare:train)")
    k.add_argument("--out", required=True, help="folder for kv_align.safetensors + kv_align.json (and pairs.pt)")
    k.add_argument("--cache-sizes", default="32,64,128,256,1024", help="cache sizes whose shifts to train on")
    k.add_argument("--sinks", type=int, default=4)
    k.add_argument("--streams", type=int, default=16, help="text streams run side by side per cache size")
    k.add_argument("--snapshots", type=int, default=24, help="moments per cache size at which pairs are read")
    k.add_argument("--per-snapshot", type=int, default=8192, help="pairs sampled per snapshot")
    k.add_argument("--epochs", type=int, default=3)
    k.add_argument("--batch-size", type=int, default=512)
    k.add_argument("--lr", type=float, default=7e-4)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--num-pos", type=int, default=1024, help="shift embeddings (largest shift + 1)")
    k.add_argument("--key-hidden", default="128,128", help="hidden sizes of the key network")
    k.add_argument("--value-hidden", default="128,128", help="hidden sizes of the value network")
    k.add_argument("--cuda-graph", action="store_true", help="stream the training text with a captured step per token")
    k.add_argument("--alphas", default="0,0.5,1",
                   help="strengths of the correction tried per cache size on validation text ('' or 1: no calibration)")
    k.add_argument("--calib-tokens", type=int, default=1024, help="validation predictions per row and (size, α)")
    k.add_argument("--lm-steps", type=int, default=300,
                   help="after the K/V fit, steps on the next-token loss of text streamed through kv mode, "
                        "backpropagated through the frozen model (0: none)")
    k.add_argument("--lm-rows", type=int, default=8, help="text rows per cache size in each --lm-steps step")
    k.add_argument("--lm-lr", type=float, default=1e-4, help="learning rate of the --lm-steps stage")
    k.add_argument("--lm-eval-every", type=int, default=100, help="validate every this many --lm-steps steps")
    k.set_defaults(func=cmd_train_kv_align)

    g = tsub.add_parser("gpt2", help="a small GPT-2 (absolute positions) trained from scratch, seeded")
    g.add_argument("--text-file", required=True, help="training text (e.g. shakespeare:train)")
    g.add_argument("--heldout", default=None, help="validation text (e.g. shakespeare:heldout)")
    g.add_argument("--out", required=True, help="folder for the model and its tokenizer")
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--dim", type=int, default=384)
    g.add_argument("--heads", type=int, default=6)
    g.add_argument("--positions", type=int, default=1024)
    g.add_argument("--seq-len", type=int, default=1024)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--steps", type=int, default=3000)
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu | cuda | auto")
    g.set_defaults(func=cmd_train_gpt2)
