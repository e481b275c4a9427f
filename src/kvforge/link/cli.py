"""`kvforge train kvlink` and `kvforge link eval` (wired into `kvforge.cli.build_parser` by `add_parsers`)."""

from __future__ import annotations

import sys

from kvforge.errors import KVForgeError
from kvforge.sharing.cli import command_group


def _template(args) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.template]


def cmd_train_kvlink(args) -> None:
    from kvforge.link.train import TrainConfig, train_kvlink
    from kvforge.models import load_model

    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, n_links=args.n_links,
                      max_docs=args.max_docs, text_fraction=args.text_fraction, two_hop_fraction=args.two_hop_fraction,
                      lora=args.lora, link_lr=args.link_lr, seed=args.seed, template=_template(args),
                      causal_fraction=args.causal_fraction)
    if not 0 <= cfg.text_fraction <= 1 or not 0 <= cfg.two_hop_fraction <= 1 or not 0 <= cfg.causal_fraction <= 1 \
            or cfg.lora < 0 or cfg.n_links < 1:
        raise KVForgeError("--text-fraction, --two-hop-fraction and --causal-fraction must be in [0, 1], --lora ≥ 0, "
                           "--n-links ≥ 1")
    if cfg.link_lr is not None and not cfg.link_lr > 0:
        raise KVForgeError(f"--link-lr {cfg.link_lr}; allowed: a learning rate > 0")
    model, tok = load_model(args.model, dtype=args.dtype or "float32", device=args.device)
    log = train_kvlink(model, tok, args.out, cfg, meta={"model": args.model, "argv": sys.argv[1:]})
    losses = log["loss"]
    head, tail = losses[: max(len(losses) // 10, 1)], losses[-max(len(losses) // 10, 1) :]
    print(f"trained {cfg.steps} steps in {log['seconds']} s: answer loss {sum(head) / len(head):.3f} -> "
          f"{sum(tail) / len(tail):.3f}; samples {log['samples']}")
    print(f"model with link tokens: {args.out} (kvforge link eval --links {args.out}); loss curve: {args.out}/loss.png")


def cmd_link_eval(args) -> None:
    from kvforge.link.evaluate import EvalConfig, parse_positions, run_link_eval

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    cfg = EvalConfig(docs=args.docs, samples=args.samples, modes=modes, positions=parse_positions(args.positions,
                     args.docs), recompute_k=args.recompute_k, max_new_tokens=args.max_new_tokens, seed=args.seed,
                     template=_template(args), ttft=not args.no_ttft, hops=args.hops)
    summary = run_link_eval(args.model, args.links, args.out, cfg, dtype=args.dtype, device=args.device,
                            argv=sys.argv[1:])
    print("mode       gold_position    n  score  95% interval    ttft_ms")
    for r in summary:
        ttft = "" if r["ttft_ms"] is None else f"{r['ttft_ms']:>8.2f}"
        print(f"{r['mode']:<10} {r['gold_position']:>13} {r['n']:>4} {r['score']:>6.3f}  "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {ttft}")
    print(f"\n{args.out}/summary.csv, {args.out}/summary.png")


def _common(p, model_default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=model_default, required=model_default is None,
                   help="alias, local dir or .gguf (default smollm2-135m)")
    p.add_argument("--template", choices=["auto", "on", "off"], default="auto",
                   help="chat template around documents and question (auto: when the tokenizer has one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda | auto")


def add_parsers(subparsers) -> None:
    t = command_group(subparsers, "train", "train or fine-tune models").add_parser(
        "kvlink", help="link tokens for document KV reuse (KVLink): segment-masked fine-tuning on generated "
                       "multi-document QA + text, loss on answers")
    _common(t, model_default=None)
    t.add_argument("--out", required=True, help="directory for the fine-tuned model with its link tokens")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch", type=int, default=8, help="sequences per step")
    t.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (linear warm-up, linear decay)")
    t.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    t.add_argument("--n-links", type=int, default=5, help="link tokens per document")
    t.add_argument("--max-docs", type=int, default=10, help="document slots (documents per sample: 2..max-docs)")
    t.add_argument("--text-fraction", type=float, default=0.2, help="share of plain-text continuation samples")
    t.add_argument("--two-hop-fraction", type=float, default=0.3, help="share of QA needing two documents")
    t.add_argument("--causal-fraction", type=float, default=0.0,
                   help="share of samples trained as ordinary causal sequences without links (the reference: 0.6), "
                        "so the model keeps its full-attention behaviour")
    t.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tune, the reference's recipe)")
    t.add_argument("--link-lr", type=float, default=None,
                   help="the link tokens' embedding rows at this learning rate, the other embedding rows frozen "
                        "(default: everything at --lr, the reference's recipe)")
    t.set_defaults(func=cmd_train_kvlink)

    e = command_group(subparsers, "link", "document KV reuse with link tokens (KVLink)").add_parser(
        "eval", help="multi-document QA, gold at chosen positions: full / naive / links / recompute; resumable")
    _common(e)
    e.add_argument("--links", default=None, help="model directory saved by `kvforge train kvlink` (mode links)")
    e.add_argument("--docs", type=int, default=10, help="documents per sample")
    e.add_argument("--samples", type=int, default=20, help="samples per gold position")
    e.add_argument("--modes", default="full,naive,links,recompute", help="comma-separated subset of "
                                                                           "full,naive,links,recompute")
    e.add_argument("--positions", default="first,middle,last", help="first,middle,last | all | 0-based indices")
    e.add_argument("--recompute-k", type=int, default=16, help="first tokens of each document recomputed")
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--hops", type=int, default=1, choices=[1, 2],
                   help="1: single-hop questions; 2: two-hop (two gold documents, the first at each --positions)")
    e.add_argument("--no-ttft", action="store_true",
                   help="answers only: skip the separately timed prefill of each request (half the work)")
    e.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    e.set_defaults(func=cmd_link_eval)
