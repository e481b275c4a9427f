"""CPU measurements for the closing notes (2-core machine): load times, generate at 2k tokens, and the
shared-prefill speed-up of `kvforge eval`.

    .venv/bin/python benchmarks/cpu_measurements.py --out runs/cpu_measurements
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/cpu_measurements")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"threads": torch.get_num_threads()}

    t = time.perf_counter()  # second load in a fresh process (the conversion cache exists)
    subprocess.run([sys.executable, "-c", "import kvforge; kvforge.load_model()"], check=True, capture_output=True)
    res["load_fresh_process_s"] = round(time.perf_counter() - t, 2)

    import kvforge
    from kvforge.eval.runner import run_eval
    from kvforge.eval.tasks import make_samples

    t = time.perf_counter()
    model, tok = kvforge.load_model()
    res["load_in_process_s"] = round(time.perf_counter() - t, 2)
    sample = make_samples("niah_single_1", tok, 2000, 1, 0)[0]
    for name in (None, "snapkv"):
        press = None if name is None else kvforge.get_press(name, compression_ratio=0.5)
        t = time.perf_counter()
        ans = kvforge.generate(model, tok, sample.context, sample.questions, press=press, max_new_tokens=16,
                               answer_prefix=sample.answer_prefix)
        res[f"generate_2k_{name or 'none'}_s"] = round(time.perf_counter() - t, 2)
        res[f"generate_2k_{name or 'none'}_answer"] = ans[0]
    res["gold"] = sample.answers[0]

    presses, ratios = ["knorm", "snapkv", "streamingllm", "adakv"], [0.25, 0.5, 0.75]
    for mode, kw in (("shared+batched", {}), ("shared", {"press_batch": 1}),
                     ("end_to_end", {"press_batch": 1, "shared_prefill": False})):
        d = out / mode.replace("+", "_")
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        run_eval("smollm2-135m", ["niah_single_1"], presses, ratios, 2000, 1, d, max_new_tokens=16, model=model,
                 tokenizer=tok, progress=False, **kw)
        res[f"sweep_{mode}_s"] = round(time.perf_counter() - t, 2)
    res["speedup_shared_batched_vs_end_to_end"] = round(res["sweep_end_to_end_s"] / res["sweep_shared+batched_s"], 2)
    res["speedup_shared_vs_end_to_end"] = round(res["sweep_end_to_end_s"] / res["sweep_shared_s"], 2)
    (out / "cpu_measurements.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
