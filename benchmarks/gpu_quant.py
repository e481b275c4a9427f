"""Attention-only decode over a KIVI-quantized cache on the GPU: the fused kernel against the bf16 baseline.

Run on a CUDA machine from the repository root (results: benchmarks/README.md):
    PYTHONPATH=src python3 benchmarks/gpu_quant.py --out gpu_quant.json
One layer, Llama-3.1-8B shapes (32 query / 8 KV heads, D = 128, bf16, batch 1), contexts 32k and 128k, bits 2
and 4, key/value groups 128 and 32, a full-precision tail of 128 entries (buffer of 256, length on the device).
Rows: (a) the fused kernel `quant_decode_attention`, (b) `decode_attention` over the dense bf16 cache of the
same context, (c) dequantize-then-SDPA (what transformers' QuantizedCache does each step). Kernels are timed
as 32 calls in one CUDA graph (rotating input sets beyond L2), dequantize+SDPA eagerly; all with CUDA events,
medians. A sweep of kernel variants at 128k comes first (compiled beforehand in parallel processes, which fill
Triton's on-disk cache); the table uses the default variant and the best one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

import torch
import torch.nn.functional as F
from gpu_attention import bench, copy_bandwidth, graph_bench

from kvforge.kernels.decode import decode_attention, dense_segments
from kvforge.kernels.quant_decode import _plan, _quant_decode_triton, quant_decode_attention, quant_decode_attention_ref
from kvforge.kernels.quantize import dequantize_keys, dequantize_values, quantize_keys, quantize_values

DEV = "cuda"
H, G, D = 8, 4, 128
TAIL, CAP = 128, 256
CONTEXTS = (32 * 1024, 128 * 1024)  # the sweep runs at the last one
DT = torch.bfloat16

BASE = dict(block_n=128, num_warps=4, num_stages=3)  # quant_decode_attention's defaults
VARIANTS = {  # name -> keyword arguments of _quant_decode_triton (waves swept separately: no recompile)
    "bn128 w4 s3": BASE,
    "bn128 w4 s2": dict(BASE, num_stages=2),
    "bn64 w4 s3": dict(BASE, block_n=64),
    "bn64 w4 s2": dict(BASE, block_n=64, num_stages=2),
    "bn256 w4 s2": dict(BASE, block_n=256, num_stages=2),
}
WAVES = (2, 4, 8)
DEFAULT = {}  # quant_decode_attention's defaults


def quant_inputs(n: int, bits: int, group: int, seed: int):
    """Context n = m coded + TAIL: random bf16 keys (per-channel offsets) and values, quantized; query; tail."""
    torch.manual_seed(seed)
    m = n - TAIL
    k = torch.randn(1, H, m, D, device=DEV, dtype=DT) + 2 * torch.randn(1, H, 1, D, device=DEV, dtype=DT)
    v = torch.randn(1, H, m, D, device=DEV, dtype=DT)
    parts = quantize_keys(k, bits, group) + quantize_values(v, bits, group)
    del k, v
    tk = torch.randn(1, H, CAP, D, device=DEV, dtype=DT)
    tv = torch.randn(1, H, CAP, D, device=DEV, dtype=DT)
    q = torch.randn(1, H * G, D, device=DEV, dtype=DT)
    tail_len = torch.tensor([TAIL], device=DEV, dtype=torch.int32)
    return q, parts, tk, tv, tail_len


def fused_bytes(parts) -> int:
    """What the fused kernel must read: codes + scales + minima + the valid tail (K and V) + the query."""
    return sum(p.numel() * p.element_size() for p in parts) + 2 * H * TAIL * D * 2 + H * G * D * 2


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def fused_call(inp, bits, group, kw):
    q, parts, tk, tv, tl = inp
    if not kw:  # the public function as callers use it
        return lambda: quant_decode_attention(q, parts, bits, group, tk, tv, tl, D**-0.5)
    return lambda: _quant_decode_triton(q, parts, bits, group, tk, tv, tl, D**-0.5, **kw)


def _warm(job) -> None:
    n, bits, group, kw = job
    try:
        fused_call(quant_inputs(n, bits, group, 0), bits, group, kw)()
        torch.cuda.synchronize()
    except Exception as e:  # reported again, and skipped, by the sweep
        print(f"precompile {bits}b g{group} {kw} failed: {e!r}"[:400])


def precompile(jobs) -> None:
    """Compile every (case, variant) once in parallel processes: they fill Triton's on-disk cache, so the timed
    process only loads the binaries (compiling ~30 variants one after another would take minutes)."""
    with multiprocessing.get_context("spawn").Pool(min(12, len(jobs))) as pool:
        pool.map(_warm, jobs)


def exact_ref(inp, bits, group):
    """softmax attention over the coded entries dequantized in float64 (no rounding to the cache dtype) + tail."""
    q, parts, tk, tv, _ = inp
    return quant_decode_attention_ref(q.double(), parts, bits, group, tk, tv, TAIL, D**-0.5,
                                      dequant_dtype=torch.float64)


def sweep(cases, refs, exact) -> tuple[list[dict], dict]:
    """Every variant × waves at 128k for each (bits, group), eager (do_bench, L2 flushed between runs). The best
    variant is the fastest in sum over the cases among those within 1e-2 of the reference everywhere."""
    rows, total = [], {}
    for (bits, group), inp in cases.items():
        for name, kw in VARIANTS.items():
            for waves in WAVES:
                kwv = dict(kw, waves=waves)
                try:
                    out = fused_call(inp, bits, group, kwv)()
                    err, err_x = rel_err(out, refs[(bits, group)]), rel_err(out, exact[(bits, group)])
                    t = bench(fused_call(inp, bits, group, kwv))
                except Exception as e:  # a variant that fails to build or run is reported, not fatal
                    print(f"variant {name} waves {waves} failed: {e!r}"[:400])
                    err, err_x, t = float("nan"), float("nan"), float("inf")
                rows.append({"bits": bits, "group": group, "variant": name, "waves": waves, "ms": t, "rel_err": err,
                             "rel_err_exact": err_x})
                ok = err < 1e-2  # False for NaN
                total[(name, waves)] = total.get((name, waves), 0.0) + (t if ok else float("inf"))
    best = min(total, key=total.get)
    return rows, dict(VARIANTS[best[0]], waves=best[1]) | {"name": f"{best[0]} waves {best[1]}"}


def compile_report(out_dir: str, dump: int = 2) -> list[dict]:
    """Registers, spills and shared memory of every compiled split kernel; the IR and SASS of the first `dump`
    (the sweep compiles 2-bit group-128 variants first) go to quant_kernels_asm.txt beside the JSON."""
    from kvforge.kernels.quant_decode import _quant_split_kernel

    rows, dumps = [], []
    try:
        for cache in _quant_split_kernel.device_caches.values():
            for key, k in cache[0].items():
                rows.append({"key": str(key)[-300:], "n_regs": getattr(k, "n_regs", None),
                             "n_spills": getattr(k, "n_spills", None), "shared": k.metadata.shared,
                             "num_warps": k.metadata.num_warps})
                if len(dumps) < dump:
                    text = f"\n########## kernel {len(dumps)}: {rows[-1]}"
                    for name in ("ttgir", "sass"):
                        try:
                            text += f"\n===== {name} =====\n{k.asm[name]}"
                        except Exception as e:
                            text += f"\n===== {name}: {e!r}"
                    dumps.append(text)
    except Exception as e:  # introspection only: never fail the benchmark on it
        rows.append({"error": repr(e)})
    with open(os.path.join(out_dir, "quant_kernels_asm.txt"), "w") as f:
        f.write("".join(dumps))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_quant.json"))
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    copy_tbs = copy_bandwidth()
    torch.cuda.empty_cache()
    print(f"copy bandwidth (read + write): {copy_tbs:.2f} TB/s")

    # sweep at the longest context
    precompile([(CONTEXTS[-1], bits, group, kw) for bits in (2, 4) for group in (128, 32)
                for kw in list(VARIANTS.values()) + [DEFAULT]])
    big, refs, exact = {}, {}, {}
    for bits in (2, 4):
        for group in (128, 32):
            inp = quant_inputs(CONTEXTS[-1], bits, group, 0)
            big[(bits, group)] = inp
            q, parts, tk, tv, tl = inp
            refs[(bits, group)] = quant_decode_attention_ref(q.double(), parts, bits, group, tk, tv, TAIL,
                                                                  D**-0.5)
            exact[(bits, group)] = exact_ref(inp, bits, group)
            print(f"{bits}b g{group}: reference (cache-dtype dequantization) vs exact: "
                  f"{rel_err(refs[(bits, group)], exact[(bits, group)]):.1e}")
    sweep_rows, best = sweep(big, refs, exact)
    # precision against the length of a program's share: one program per (row, head) over all 128k entries
    for (bits, group), inp in big.items():
        out = fused_call(inp, bits, group, dict(BASE, waves=1, sms=1))()
        print(f"{bits}b g{group} one program per head: rel err vs reference {rel_err(out, refs[(bits, group)]):.1e}, "
              f"vs exact {rel_err(out, exact[(bits, group)]):.1e}")
        sweep_rows.append({"bits": bits, "group": group, "variant": "one program per head", "waves": 1,
                           "ms": None, "rel_err": rel_err(out, refs[(bits, group)]),
                           "rel_err_exact": rel_err(out, exact[(bits, group)])})
    del big, refs, exact
    torch.cuda.empty_cache()
    print(f"{'bits':>4} {'group':>5} {'variant':<22} {'waves':>5} {'ms':>8} {'rel_err':>8} {'vs exact':>8}")
    for r in sweep_rows:
        ms = f"{r['ms']:>8.4f}" if r["ms"] is not None else f"{'':>8}"
        print(f"{r['bits']:>4} {r['group']:>5} {r['variant']:<22} {r['waves']:>5} {ms} {r['rel_err']:>8.1e} "
              f"{r['rel_err_exact']:>8.1e}")
    print("best variant (summed over the 4 cases):", best)
    best_kw = {k: v for k, v in best.items() if k != "name"}

    rows = []
    for n in CONTEXTS:
        # (b) dense bf16 baseline over the same context
        dense_bytes = 2 * H * n * D * 2

        def make_dense(i, n=n):
            kd = torch.randn(1, H, n, D, device=DEV, dtype=DT)
            vd = torch.randn(1, H, n, D, device=DEV, dtype=DT)
            qd = torch.randn(1, H * G, D, device=DEV, dtype=DT)
            kf, od, ld = dense_segments(kd, n)
            return lambda: decode_attention(qd, kf, vd.view(-1, D), od, ld, D**-0.5, max_len=n, total=H * n)

        t_dense = graph_bench(make_dense, dense_bytes)
        torch.cuda.empty_cache()
        for bits in (2, 4):
            for group in (128, 32):
                inp = quant_inputs(n, bits, group, 1)
                q, parts, tk, tv, tl = inp
                nbytes = fused_bytes(parts)
                ref = quant_decode_attention_ref(q.double(), parts, bits, group, tk, tv, TAIL, D**-0.5)
                found, sets = {}, {0: inp}

                def input_set(i, n=n, bits=bits, group=group, sets=sets):  # rotation sets beyond L2, made once
                    if i not in sets:
                        sets[i] = quant_inputs(n, bits, group, 2 + i)
                    return sets[i]

                for label, kw in (("fused (default)", DEFAULT), ("fused (best)", best_kw)):
                    err = rel_err(fused_call(inp, bits, group, kw)(), ref)
                    t_eager = bench(fused_call(inp, bits, group, kw))
                    t = graph_bench(lambda i, kw=kw: fused_call(input_set(i), bits, group, kw), nbytes)
                    found[label] = (t, t_eager, err)

                def deq_sdpa(q=q, parts=parts, tk=tk, tv=tv, bits=bits, group=group):
                    kq, ks, kz, vq, vs, vz = parts
                    keys = torch.cat([dequantize_keys(kq, ks, kz, bits, group, DT), tk[:, :, :TAIL]], 2)
                    vals = torch.cat([dequantize_values(vq, vs, vz, bits, group, DT), tv[:, :, :TAIL]], 2)
                    return F.scaled_dot_product_attention(q[:, :, None], keys, vals, enable_gqa=True)[:, :, 0]

                err_sdpa = rel_err(deq_sdpa(), ref)
                t_sdpa = bench(deq_sdpa)
                entries = [(label, t, te, e, nbytes) for label, (t, te, e) in found.items()]
                entries += [("bf16 decode_attention", t_dense, None, None, dense_bytes),
                            ("dequantize + SDPA", t_sdpa, t_sdpa, err_sdpa, nbytes)]
                for label, t, te, e, nb in entries:
                    rows.append({"context": n, "bits": bits, "group": group, "kernel": label, "ms": t, "ms_eager": te,
                                 "bytes": nb, "TB/s": nb / t / 1e9, "frac_copy": nb / t / 1e9 / copy_tbs,
                                 "vs_bf16": t / t_dense, "floor_ms": nb / copy_tbs / 1e9, "rel_err": e,
                                 "plan": _plan(bits, group, D, D, None) if "default" in label else None})
                del inp, q, parts, tk, tv, tl, ref, sets
                torch.cuda.empty_cache()

    print(f"\ncopy bandwidth {copy_tbs:.2f} TB/s; best variant: {best['name']}; ms = CUDA graph x32 per call "
          "(dequantize + SDPA: eager); frac = bytes / ms / copy bandwidth; dequantize + SDPA counts only its inputs")
    print(f"{'ctx':>5} {'bits':>4} {'grp':>4} {'kernel':<22} {'ms':>8} {'eager':>8} {'MB':>7} {'floor':>7} "
          f"{'frac':>6} {'/bf16':>6} {'rel_err':>8}")
    for r in rows:
        eager = f"{r['ms_eager']:>8.4f}" if r["ms_eager"] is not None else f"{'':>8}"
        err = f"{r['rel_err']:>8.1e}" if r["rel_err"] is not None else f"{'':>8}"
        print(f"{r['context'] // 1024:>4}k {r['bits']:>4} {r['group']:>4} {r['kernel']:<22} {r['ms']:>8.4f} {eager} "
              f"{r['bytes'] / 1e6:>7.1f} {r['floor_ms']:>7.4f} {r['frac_copy']:>6.1%} {r['vs_bf16']:>6.3f} {err}")
    kernels = compile_report(os.path.dirname(os.path.abspath(args.out)))
    for r in kernels:
        print({k: v for k, v in r.items() if k != "key"})
    ok = all(r["rel_err"] is None or r["rel_err"] < 1e-2 for r in rows)  # sweep rows may hold losers
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": copy_tbs, "best_variant": best,
                   "sweep_128k": sweep_rows, "rows": rows,
                   "kernels": kernels}, f, indent=2)
    print("correctness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
