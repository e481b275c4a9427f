"""`kvforge convert lckv` and `kvforge train lckv`: wired into `kvforge.cli.build_parser` by `add_parsers(sub)`.

`convert` and `train` are command groups other packages add sub-commands to as well: `command_group` creates a
group on first use and returns the same one afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvforge.errors import KVForgeError
from kvforge.sharing.layer_map import PRESETS, LayerMap, preset


def command_group(subparsers, name: str, help: str):
    """The sub-command action of the top-level command `name` (e.g. `train`), created on first use, so that several
    packages can add `kvforge train <what>` commands. The group keeps its action as the default `subcommands`."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help)
        parser.set_defaults(subcommands=parser.add_subparsers(dest=f"{name}_what", required=True))
    group = parser.get_default("subcommands")
    if group is None:
        raise RuntimeError(f"`kvforge {name}` was created without kvforge.sharing.cli.command_group; create it "
                           "with command_group so every package can add to it")
    return group


def add_parsers(subparsers) -> None:
    c = command_group(subparsers, "convert", "convert a pretrained model to another architecture").add_parser(
        "lckv", help="a Llama-architecture model to cross-layer KV sharing (mean k/v of the layers that share)")
    c.add_argument("--model", required=True, help="alias, local dir or .gguf of a Llama-architecture model")
    c.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (for the model's layer count)")
    c.add_argument("--layers", default=None, help='or the layer map itself, e.g. "0_20_20_..._21" (s = sliding)')
    c.add_argument("--warmup", type=int, default=2, help="warm-up (standard) layers of the lckv preset (default 2)")
    c.add_argument("--sliding-window", type=int, default=None, help="window of layers marked s (default 4096)")
    c.add_argument("--forward-passes", type=int, default=None, help="m: passes without gradient (default 7)")
    c.add_argument("--backward-passes", type=int, default=None, help="b: passes with gradient (default 2)")
    c.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32 on CPU)")
    c.add_argument("--out", required=True, help="directory for the converted model and its tokenizer")
    c.set_defaults(func=cmd_convert)

    t = command_group(subparsers, "train", "train or fine-tune models").add_parser(
        "lckv", help="continued pre-training of a shared-KV model (parallel iterative forward); resumable")
    t.add_argument("--model", required=True, help="directory of a shared-KV model (`kvforge convert lckv`)")
    t.add_argument("--text-file", required=True, help="training text; its last --eval-fraction is held out")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps")
    t.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=10)
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps")
    t.add_argument("--eval-fraction", type=float, default=0.1)
    t.add_argument("--num-iterations", type=int, default=None, help="passes of the parallel forward (default m + b)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu | cuda | auto (default auto)")
    t.add_argument("--dtype", default=None, help="float32 (default) | bfloat16")
    t.set_defaults(func=cmd_train)


def layer_map_from_args(args: argparse.Namespace, num_layers: int) -> LayerMap:
    if (args.preset is None) == (args.layers is None):
        raise KVForgeError(f"give exactly one of --preset ({', '.join(PRESETS)}) or --layers")
    if args.preset is not None:
        return preset(args.preset, num_layers, warmup=args.warmup)
    return LayerMap.parse(args.layers, num_layers)


def cmd_convert(args: argparse.Namespace) -> None:
    from kvforge.models import load_model
    from kvforge.sharing.convert import convert

    if (args.preset is None) == (args.layers is None):  # before loading anything
        raise KVForgeError(f"give exactly one of --preset ({', '.join(PRESETS)}) or --layers")
    if args.layers is not None:
        LayerMap.parse(args.layers)  # a malformed string fails before the model loads
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    lm = layer_map_from_args(args, model.config.num_hidden_layers)
    options = {k: getattr(args, k) for k in ("sliding_window", "forward_passes", "backward_passes")
               if getattr(args, k) is not None}
    new = convert(model, lm, **options)
    out = Path(args.out)
    new.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{args.model}: {len(lm.producers)} of {len(lm)} layers store KV ({lm}) -> {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from kvforge.sharing.train import train

    m = train(args.model, args.text_file, args.steps, args.out, seq_len=args.seq_len, batch_size=args.batch_size,
              lr=args.lr, warmup=args.warmup_steps, save_every=args.save_every, eval_fraction=args.eval_fraction,
              seed=args.seed, device=args.device, dtype=args.dtype, num_iterations=args.num_iterations)
    print(f"{m['steps']} steps in {m['wall_seconds']:.1f} s; held-out perplexity {m['ppl_before']:.3f} -> "
          f"{m['ppl_after']:.3f}; model, loss.csv, loss.png, metrics.json in {args.out}")
