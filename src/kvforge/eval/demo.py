"""`kvforge demo` (what `make demo`): a small sweep on the embedded model, sized to show a real signal on CPU.

Few presses, many samples: one needle task, no compression against a press that keeps the needle (TOVA), one that
evicts the middle of the context (StreamingLLM: sinks + recent window) and a query-aware one (Quest: nothing
evicted, each decoding step reads the pages its query ranks highest), at two ratios, with 95% intervals in
`summary.csv` and the report. About 4-5 minutes on 2 idle CPU cores (168 runs; 10 minutes measured with the
cores shared by other jobs).
"""

from __future__ import annotations

import time

from kvforge.eval.runner import format_table, run_eval, write_summary

DEMO_TASKS = {"niah_single_1": 24}  # task -> samples: n >= 20 per cell, so intervals can separate
DEMO_PRESSES = ["tova", "streamingllm", "quest"]
DEMO_LENGTH = 2000
DEMO_RATIOS = [0.5, 0.75]
DEMO_MAX_NEW_TOKENS = 16
DEMO_PRESS_BATCH = 8  # (press, ratio) forks answered together as one batch


def run_demo(out: str = "runs/demo", model_name: str = "smollm2-135m", samples: int | None = None,
             overwrite: bool = False) -> None:
    t0 = time.perf_counter()
    per_task = {t: n if samples is None else samples for t, n in DEMO_TASKS.items()}
    run_eval(model_name, list(DEMO_TASKS), DEMO_PRESSES, DEMO_RATIOS, DEMO_LENGTH, per_task, out,
             max_new_tokens=DEMO_MAX_NEW_TOKENS, argv=["demo"], press_batch=DEMO_PRESS_BATCH, overwrite=overwrite)
    rows = write_summary(out)
    print(format_table(rows))
    print("\nci_low/ci_high: 95% interval; vs_baseline says lower/higher only where the intervals separate. "
          "The full method table (GPU, both models, n = 100 per cell): benchmarks/accuracy/")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {out}/report.html")
