"""`kvforge demo` (what `make demo` runs): a compact sweep on the embedded model, CPU-sized."""

from __future__ import annotations

import time

from kvforge.eval.runner import format_table, run_eval, write_summary
from kvforge.presses.registry import PRESSES

DEMO_TASKS = {"niah_single_1": 3, "niah_multikey_1": 2, "facts_qa": 1}  # task -> samples (fits 10 min on 2 cores)
DEMO_LENGTH = 2000
DEMO_RATIOS = [0.25, 0.5, 0.75]
DEMO_MAX_NEW_TOKENS = 16
DEMO_PRESS_BATCH = 21  # (press, ratio) forks answered together as one batch


ALIASES = {"l2norm"}  # same selection as another press (see its docstring)


def demo_presses() -> list[str]:
    """Every registered press that compresses the context at prefill from a ratio alone: scorers, merges and
    AdaKV (over SnapKV). Wrappers that need other presses as arguments (composed, chunk, merge) and
    decode-time presses are left to `kvforge eval`."""
    kinds = ("prefill", "merge")
    return [n for n, c in sorted(PRESSES.items()) if (c.kind in kinds or n == "adakv") and n not in ALIASES]


def run_demo(out: str = "runs/demo", model_name: str = "smollm2-135m", samples: int | None = None,
             overwrite: bool = False) -> None:
    t0 = time.perf_counter()
    per_task = {t: n if samples is None else samples for t, n in DEMO_TASKS.items()}
    run_eval(model_name, list(DEMO_TASKS), demo_presses(), DEMO_RATIOS, DEMO_LENGTH, per_task, out,
             max_new_tokens=DEMO_MAX_NEW_TOKENS, argv=["demo"], press_batch=DEMO_PRESS_BATCH, overwrite=overwrite)
    rows = write_summary(out)
    print(format_table(rows))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {out}/report.html")
