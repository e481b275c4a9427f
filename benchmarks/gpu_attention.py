"""Attention-only decode on the GPU: correctness of the Triton segments kernel, then its bandwidth.

Run on a CUDA machine from the repository root (it imports the CUDA test's graph set-up from tests/):
    PYTHONPATH=src python3 benchmarks/gpu_attention.py
Writes $OUT/gpu_attention.json (OUT defaults to .) and prints a table; results: benchmarks/README.md.
Llama-3.1-8B shapes: 32 query / 8 KV heads, D = 128, bf16.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_kernels import pdl_graph_replays  # noqa: E402  (the CUDA test's graph set-up)

from kvforge.kernels.decode import (
    _launch_split,
    _plan,
    decode_attention,
    decode_attention_ref,
    dense_segments,
    launch_merge,
)

DEV = "cuda"
H, G, D = 8, 4, 128
OUT = os.environ.get("OUT", ".")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def graph_bench(make_call, nbytes_per_call: int, layers: int = 32) -> float:
    """Per-call time (ms) of `layers` calls captured in one CUDA graph, as in a decode step, rotating over
    enough input sets to exceed the L2 cache. `make_call(i)` returns the i-th call."""
    sets = max(1, min(8, -(-256 * 2**20 // max(nbytes_per_call, 1))))
    calls = [make_call(i) for i in range(sets)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(layers):
            calls[i % sets]()
    return bench(g.replay) / layers


def copy_bandwidth() -> float:
    x = torch.randn(2 * 1024**3 // 2, dtype=torch.bfloat16, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e12  # TB/s, bytes read + written


def packed(lengths: list[int], b: int, dtype=torch.bfloat16):
    """Random packed segments: flat K/V with the given per-(row, head) lengths, back to back."""
    lens = torch.tensor(lengths, device=DEV, dtype=torch.int32)
    offs = torch.zeros(len(lengths), device=DEV, dtype=torch.int64)
    offs[1:] = torch.cumsum(lens[:-1].to(torch.int64), 0)
    total = int(lens.sum())
    k = torch.randn(max(total, 1), D, device=DEV, dtype=dtype)
    v = torch.randn(max(total, 1), D, device=DEV, dtype=dtype)
    q = torch.randn(b, H * G, D, device=DEV, dtype=dtype)
    return q, k, v, offs, lens


def budgets(n: int, keep: float, skewed: bool = False) -> list[int]:
    """Per-head entries kept of an n-token cache: all n at keep = 1 (the whole cache: what an uncompressed cache
    holds), else ragged budgets around the mean (AdaKV-like, 0.5-1.5x the mean) summing to keep x the whole
    cache; `skewed`: heavy-tailed budgets (weights rand^3, so one head may keep the whole cache and others
    almost nothing, as AdaKV's can on a trained model), each clamped at n, so the sum may fall a little short."""
    if keep >= 1.0:
        return [n] * H
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(H, generator=gen) ** 3 if skewed else torch.rand(H, generator=gen) + 0.5
    return (w / w.sum() * H * n * keep).long().clamp(max=n).tolist()


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def check_correctness() -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [("ragged b1", 1, None), ("ragged b3", 3, None), ("zeros and ones", 2, [0, 1] * 8), ("dense", 2, "dense")]
    for name, b, spec in cases:
        for dtype in (torch.bfloat16, torch.float16):
            if spec == "dense":
                n = 3001
                kb = torch.randn(b, H, n + 77, D, device=DEV, dtype=dtype)
                vb = torch.randn(b, H, n + 77, D, device=DEV, dtype=dtype)
                k, offs, lens = dense_segments(kb, n)
                v = vb.view(-1, D)
                q = torch.randn(b, H * G, D, device=DEV, dtype=dtype)
                sd = F.scaled_dot_product_attention(q[:, :, None], kb[:, :, :n], vb[:, :, :n], enable_gqa=True)[:, :, 0]
            else:
                lengths = spec or torch.randint(0, 5000, (b * H,), generator=gen).tolist()
                lengths[0] = 0 if spec is None else lengths[0]
                q, k, v, offs, lens = packed(lengths, b, dtype)
                sd = None
            out = decode_attention(q, k, v, offs, lens, D**-0.5)
            ref = decode_attention_ref(q.double(), k.double(), v.double(), offs, lens, D**-0.5)
            err = rel_err(out, ref)
            row = {"case": name, "dtype": str(dtype), "rel_err": err, "nan": bool(torch.isnan(out).any())}
            row["pdl_rel_err"], nan = pdl_in_graph(q, k, v, offs, lens, ref)
            row["nan"] |= nan
            if sd is not None:
                row["rel_err_vs_sdpa"] = rel_err(out, sd)
            rows.append(row)
    return rows


def pdl_in_graph(q, k, v, offs, lens, ref) -> tuple[float, bool]:
    """`pdl=True` where it matters (tests/test_kernels.py `pdl_graph_replays`: in a CUDA graph between the
    kernel that writes the query and one that reads the output, three replays): the worst relative error
    against the reference, and whether any NaN appeared."""
    outs = [o.clone() for o in pdl_graph_replays(q, k, v, offs, lens)]
    return max(rel_err(o, ref) for o in outs), any(bool(torch.isnan(o).any()) for o in outs)


VARIANTS = [dict(block_n=bn, num_stages=st, waves=w, num_warps=nw) for bn in (64, 128) for st in (2, 3, 4)
            for w in (2, 4, 8) for nw in (4, 8)]


def tune() -> dict:
    """Pick the kernel variant with the best summed time over dense-128k and packed-25% cases."""
    cases = []
    for n, keep in ((131072, 1.0), (131072, 0.25), (32768, 1.0), (32768, 0.25)):
        lengths = budgets(n, keep)
        cases.append((packed(lengths, 1), max(lengths), sum(lengths)))
    best, results = None, []
    for var in VARIANTS:
        t = 0.0
        for (q, k, v, o, ln), mx, tot in cases:
            t += bench(lambda: decode_attention(q, k, v, o, ln, D**-0.5, max_len=mx, total=tot, **var))
        results.append((t, var))
        if best is None or t < best[0]:
            best = (t, var)
    results.sort(key=lambda r: r[0])
    for t, var in results[:5]:
        print(f"variant {var}: {t:.4f} ms summed")
    torch.cuda.empty_cache()
    return best[1]


def timing(copy_tbs: float, var: dict) -> list[dict]:
    rows = []
    for n in (32 * 1024, 128 * 1024):
        kb = torch.randn(1, H, n, D, device=DEV, dtype=torch.bfloat16)
        vb = torch.randn(1, H, n, D, device=DEV, dtype=torch.bfloat16)
        q = torch.randn(1, H * G, D, device=DEV, dtype=torch.bfloat16)
        full_bytes = 2 * H * n * D * 2
        k, offs, lens = dense_segments(kb, n)
        t_tri = bench(lambda: decode_attention(q, k, vb.view(-1, D), offs, lens, D**-0.5, max_len=n, total=H * n,
                                               **var))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], kb, vb, enable_gqa=True))
        def make_dense(i, n=n):
            kd = torch.randn(1, H, n, D, device=DEV, dtype=torch.bfloat16)
            vd = torch.randn(1, H, n, D, device=DEV, dtype=torch.bfloat16)
            qd = torch.randn(1, H * G, D, device=DEV, dtype=torch.bfloat16)
            kf, od, ld = dense_segments(kd, n)
            return lambda: decode_attention(qd, kf, vd.view(-1, D), od, ld, D**-0.5, max_len=n, total=H * n,
                                            **var)

        bench_dense = graph_bench(make_dense, full_bytes)
        for name, t, nbytes in (("triton dense", t_tri, full_bytes), ("sdpa dense (enable_gqa)", t_sdpa, full_bytes),
                                ("triton dense, CUDA graph x32", bench_dense, full_bytes)):
            rows.append({"context": n, "kernel": name, "kept": 1.0, "ms": t, "TB/s": nbytes / t / 1e9,
                         "frac_copy": nbytes / t / 1e9 / copy_tbs})
        for keep, skewed in ((1.0, False), (0.25, False), (0.25, True)):
            lengths = budgets(n, keep, skewed)
            kept, tag = round(sum(lengths) / (H * n), 3), " (skewed)" if skewed else ""
            qq, kk, vv, oo, ll = packed(lengths, 1)
            nbytes = 2 * sum(lengths) * D * 2
            mx = max(lengths)
            t = bench(lambda: decode_attention(qq, kk, vv, oo, ll, D**-0.5, max_len=mx, total=sum(lengths), **var))
            rows.append({"context": n, "kernel": "triton packed head-varlen" + tag, "kept": kept, "ms": t,
                         "TB/s": nbytes / t / 1e9, "frac_copy": nbytes / t / 1e9 / copy_tbs})

            def make(i, lengths=lengths, mx=mx):
                q2, k2, v2, o2, l2 = packed(lengths, 1)
                return lambda: decode_attention(q2, k2, v2, o2, l2, D**-0.5, max_len=mx, total=sum(lengths), **var)

            tg = graph_bench(make, nbytes)
            rows.append({"context": n, "kernel": "triton packed, CUDA graph x32" + tag, "kept": kept, "ms": tg,
                         "TB/s": nbytes / tg / 1e9, "frac_copy": nbytes / tg / 1e9 / copy_tbs})
            # the same budgets through SDPA on a padded layout (pad every head to the longest, mask the rest)
            kp = torch.randn(1, H, mx, D, device=DEV, dtype=torch.bfloat16)
            vp = torch.randn(1, H, mx, D, device=DEV, dtype=torch.bfloat16)
            mask = (torch.arange(mx, device=DEV)[None, :] < torch.tensor(lengths, device=DEV)[:, None])[None, :, None]
            qf = qq.view(1, H, G, D)
            t_pad = bench(lambda: F.scaled_dot_product_attention(qf, kp, vp, attn_mask=mask))
            rows.append({"context": n, "kernel": "sdpa padded + mask" + tag, "kept": kept, "ms": t_pad,
                         "TB/s": nbytes / t_pad / 1e9, "frac_copy": nbytes / t_pad / 1e9 / copy_tbs})
        torch.cuda.empty_cache()
    return rows


# (waves, tile, stages, pdl): pdl = both kernels launched with programmatic dependent launch
SWEEP = [(w, bn, st, pdl) for w in (2, 3, 4) for bn in (64, 128) for st in (2, 3) for pdl in (False, True)]


def sweep(copy_tbs: float) -> list[dict]:
    """Per-call time in a CUDA graph x32 at 128k, full and 25% packed (ragged), for waves x block x stages x
    PDL, and where the time of the default variant goes: split kernel alone,
    merge kernel alone (target: 25% <= 0.3x of full)."""
    rows = []
    n = 128 * 1024
    for keep in (1.0, 0.25):
        lengths = budgets(n, keep)
        inputs = [packed(lengths, 1) for _ in range(2)]  # graph_bench rotates over <= 2 sets at these sizes
        nbytes = 2 * sum(lengths) * D * 2
        mx, tot = max(lengths), sum(lengths)
        for waves, block_n, stages, pdl in SWEEP:
            kw = dict(waves=waves, block_n=block_n, num_stages=stages, pdl=pdl)

            def make(i, inputs=inputs, kw=kw):  # noqa: B006 (per variant, never mutated)
                q2, k2, v2, o2, l2 = inputs[i % len(inputs)]
                return lambda: decode_attention(q2, k2, v2, o2, l2, D**-0.5, max_len=mx, total=tot, **kw)
            try:
                t = graph_bench(make, nbytes)
            except Exception as e:  # e.g. a tile that needs more shared memory than the device has
                print(f"sweep variant {(waves, block_n, stages, pdl)} failed: {type(e).__name__}: {e}"[:300])
                continue
            rows.append({"kept": keep, "waves": waves, "block_n": block_n, "stages": stages, "pdl": pdl, "ms": t,
                         "frac_copy": nbytes / t / 1e9 / copy_tbs})
        for pdl in (False, True):  # default launch parameters: the split kernel alone, the merge kernel alone
            plans = [_plan(q2, v2, o2, l2, mx, tot, None, None, None, None) for q2, _, v2, o2, l2 in inputs]

            for plan, (q2, k2, v2, o2, l2) in zip(plans, inputs):  # valid partials for the merge-only rows
                _launch_split(plan, q2, k2, v2, o2, l2, D**-0.5, 4, 2, False)

            def split_only(i, plans=plans, pdl=pdl, inputs=inputs):
                q2, k2, v2, o2, l2 = inputs[i % len(inputs)]
                return lambda: _launch_split(plans[i % len(plans)], q2, k2, v2, o2, l2, D**-0.5, 4, 2, pdl)

            def merge_only(i, plans=plans, pdl=pdl):
                h, m, lse, acc, out = plans[i % len(plans)][0], *plans[i % len(plans)][5:]
                return lambda: launch_merge(m, lse, acc, out, h, pdl)
            rows.append({"kept": keep, "part": "split kernel only", "pdl": pdl, "ms": graph_bench(split_only, nbytes)})
            rows.append({"kept": keep, "part": "merge kernel only", "pdl": pdl, "ms": graph_bench(merge_only, nbytes)})
        del inputs
        torch.cuda.empty_cache()
    key = ("waves", "block_n", "stages", "pdl")
    full = {tuple(r[k] for k in key): r["ms"] for r in rows if r["kept"] == 1.0 and "part" not in r}
    for r in rows:
        if r["kept"] == 0.25 and full and "part" not in r:
            r["of_full_same_variant"] = r["ms"] / full.get(tuple(r[k] for k in key), float("nan"))
            r["of_full_best"] = r["ms"] / min(full.values())
    return rows


def read_floor(copy_tbs: float) -> list[dict]:
    """What a plain read of the same bytes costs: torch.sum (float32 accumulation) over a bf16 buffer the size
    of the 128k whole cache's K + V (537 MB) and of a quarter of it, captured x32 in a graph like the attention
    rows. If a quarter of the bytes already takes > 0.3x as long here, the attention target is below what one
    streaming kernel can do on this device."""
    rows = []
    n = 128 * 1024
    for keep in (1.0, 0.25):
        nbytes = int(2 * H * n * D * 2 * keep)

        def make(i, nbytes=nbytes):
            x = torch.randn(nbytes // 2, device=DEV, dtype=torch.bfloat16)
            return lambda: torch.sum(x, dtype=torch.float32)
        t = graph_bench(make, nbytes)
        rows.append({"kernel": "torch sum (read only)", "kept": keep, "bytes": nbytes, "ms": t,
                     "TB/s": nbytes / t / 1e9, "frac_copy": nbytes / t / 1e9 / copy_tbs})
        torch.cuda.empty_cache()
    rows[1]["of_full"] = rows[1]["ms"] / rows[0]["ms"]
    return rows


def main() -> int:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    copy_tbs = copy_bandwidth()
    print(f"copy bandwidth (read + write): {copy_tbs:.2f} TB/s")
    checks = check_correctness()
    for c in checks:
        print(c)
    ok = all(max(c["rel_err"], c["pdl_rel_err"]) < 1e-2 and not c["nan"] for c in checks)
    var = tune() if os.environ.get("KVFORGE_TUNE") else {}  # default: the engine's own launch parameters
    print("chosen variant:", var)
    times = timing(copy_tbs, var)
    print(f"{'context':>8} {'kernel':<38} {'kept':>5} {'ms':>8} {'TB/s':>6} {'of copy':>7}")
    for r in times:
        print(f"{r['context']:>8} {r['kernel']:<38} {r['kept']:>5} {r['ms']:>8.4f} {r['TB/s']:>6.2f} "
              f"{r['frac_copy']:>7.1%}")
    floor = read_floor(copy_tbs)
    for r in floor:
        print("read floor", {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    swept = sweep(copy_tbs) if os.environ.get("KVFORGE_SWEEP", "1") == "1" else []
    parts = [r for r in swept if "part" in r]
    variants = [r for r in swept if "part" not in r]
    for r in parts + sorted((r for r in variants if r["kept"] == 1.0), key=lambda r: r["ms"])[:6] + sorted(
            (r for r in variants if r["kept"] == 0.25), key=lambda r: r["ms"])[:8]:
        print("sweep", {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    with open(os.path.join(OUT, "gpu_attention.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_TBps": copy_tbs, "checks": checks, "variant": var,
                   "timing": times, "read_floor": floor, "sweep": swept}, f, indent=2)
    print("correctness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
