"""`kvforge demo` (what `make demo` runs): a compact sweep on the embedded model, CPU-sized."""

from __future__ import annotations

import time

from kvforge.eval.runner import format_table, run_eval, write_summary
from kvforge.presses.registry import PRESSES

DEMO_TASKS = {"niah_single_1": 6, "niah_multikey_1": 4, "facts_qa": 3}  # task -> samples
DEMO_LENGTH = 2000
DEMO_RATIOS = [0.25, 0.5, 0.75]
DEMO_MAX_NEW_TOKENS = 20
DEMO_PRESS_BATCH = 12  # (press, ratio) forks answered together as one batch


def demo_presses() -> list[str]:
    """Every registered press that compresses at prefill from a ratio alone."""
    return [name for name, cls in sorted(PRESSES.items()) if cls.kind in ("prefill", "wrapper")]


def run_demo(out: str = "runs/demo", model_name: str = "smollm2-135m", samples: int | None = None) -> None:
    t0 = time.perf_counter()
    per_task = {t: samples or n for t, n in DEMO_TASKS.items()}
    run_eval(model_name, list(DEMO_TASKS), demo_presses(), DEMO_RATIOS, DEMO_LENGTH, per_task, out,
             max_new_tokens=DEMO_MAX_NEW_TOKENS, argv=["demo"], press_batch=DEMO_PRESS_BATCH)
    rows = write_summary(out)
    print(format_table(rows))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {out}/report.html")
