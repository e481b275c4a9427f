"""Time to first token with reused documents (kvforge.link) vs an ordinary prefill, and the store's read time.

    PYTHONPATH=src python benchmarks/link_ttft.py --config llama3.1-8b --docs 10 --doc-tokens 1000 --question 64 \
        --out benchmarks/results/link_ttft_h200.json

Random-weight model of a named config (`kvforge.models.random_config`), random token ids (the timings do not depend
on the weights or the text). Per repeat (median over `--repeats`, after one untimed warm-up of each path):
- `full_ms`: one ordinary causal prefill of the documents + question (KVCache), to the question's last logits;
- `reuse_ms`: `link.prefill_ids` with the documents' KV already on the device (a MemoryStore): re-rotation,
  concatenation and the question's forward; `reuse_links_ms`: the same with `--links` link tokens per document
  (their forward included); `reuse_graph_ms`: `reuse_ms` with the question's forward replaying one captured step
  (`GraphForward`, captured once in the warm-up, the placed documents copied into its static buffers);
- `store_read_warm_ms` / `store_read_cold_ms`: reading every document from a DocumentStore on disk (checksum
  verified, moved to the device), with the files in the page cache / after asking the kernel to drop them
  (`posix_fadvise(DONTNEED)`; a file system that ignores it reads warm);
- `reuse_from_store_{warm,cold}_ms`: read + reuse, end to end;
- `prompt_forward_ms`: the question's forward alone over an already assembled cache (the engine's share of
  `reuse_ms`; the rest is placing the documents); `prompt_forward_host_ms`: the same forward until the call returns
  (the device synchronised before, not after): the host's share. Equal to `prompt_forward_ms` when the forward is
  launch-bound (the host, not the device, sets its time).
Paths are timed round robin (each repeat times every path once), so a drift of the machine touches all alike.
`--no-cudnn-sdpa` turns cuDNN's SDPA off for every path alike (`torch.backends.cuda.enable_cudnn_sdp(False)`, set
before anything runs, warm-ups included): with boolean masks (link tokens, padded batches) torch may pick cuDNN,
which builds a graph per mask shape. The JSON records the SDPA backends enabled (`sdpa`) and which kernel the
question's bottom-right causal attention can take (`question_attention`: flash / efficient / a materialised mask).
Writes `--out` (JSON) with the settings, device, commit and every repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvforge import KVCache
from kvforge.cache.graphs import GraphForward
from kvforge.eval.runs import device_name, git_commit, versions
from kvforge.link import DocumentStore, Links, MemoryStore
from kvforge.link.reuse import Request, document_cache, prefill_ids
from kvforge.models import load_model


def _versions() -> dict:
    try:
        return versions()
    except Exception as e:  # noqa: BLE001 (kvforge run from src/ without being installed)
        return {"error": str(e), "torch": torch.__version__}


def timed(fn, device, host_only: bool = False) -> float:
    """Milliseconds of `fn()`, synchronised with the device (`host_only`: before only; the device's remaining work
    is waited for outside the clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda" and not host_only:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1000
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ms


def sdpa_backends() -> dict:
    """The SDPA backends torch may pick from (`torch.backends.cuda.*_sdp_enabled`)."""
    b = torch.backends.cuda
    return {"cudnn": b.cudnn_sdp_enabled(), "flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(),
            "math": b.math_sdp_enabled()}


def question_attention(model, n_ctx: int, q: int, device) -> str:
    """The kernel the question's attention can take: kvforge applies an unpadded causal forward over a longer cache
    as SDPA's bottom-right causal bias, which runs flash, else memory-efficient attention, else materialises a
    `[q, n]` mask (SDPA then picks a backend for a boolean mask, cuDNN included). Checked with the forward's shapes."""
    if device.type != "cuda":
        return "materialised mask (not CUDA)"
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    query = torch.empty(1, cfg.num_attention_heads, q, d, dtype=dtype, device=device)
    key = torch.empty(1, cfg.num_key_value_heads, n_ctx + q, d, dtype=dtype, device=device)
    gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    params = torch.backends.cuda.SDPAParams(query, key, key, None, 0.0, False, gqa)
    if torch.backends.cuda.can_use_flash_attention(params):
        return "flash"
    if torch.backends.cuda.can_use_efficient_attention(params):
        return "efficient"
    return "materialised mask"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="llama3.1-8b", help="random-weight config (kvforge.models.RANDOM_CONFIGS)")
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--question", type=int, default=64, help="question tokens")
    ap.add_argument("--links", type=int, default=5, help="link tokens per document for reuse_links_ms (0: skip)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--store", default=None, help="DocumentStore directory (default: a temporary one on local disk)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="turn cuDNN's SDPA off for every path (full and reuse alike), warm-ups included")
    ap.add_argument("--out", default="link_ttft.json")
    args = ap.parse_args()
    if args.no_cudnn_sdpa:  # before anything runs: every path and warm-up under the same setting
        torch.backends.cuda.enable_cudnn_sdp(False)

    model, _ = load_model(args.config, random_weights=True, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    hi = model.config.vocab_size
    docs = [torch.randint(100, hi, (args.doc_tokens,), generator=gen).tolist() for _ in range(args.docs)]
    question = torch.randint(100, hi, (args.question,), generator=gen).tolist()
    req = Request([], docs, [question])
    links = None
    if args.links:
        ids = tuple(range(1000, 1000 + args.links * args.docs))
        links = Links(args.links, args.docs, tuple(f"<link{i}>" for i in ids), ids)  # existing ids stand in

    def full():
        ids = torch.tensor([[t for d in docs for t in d] + question], device=device)
        with torch.inference_mode():
            model(input_ids=ids, past_key_values=KVCache(model), use_cache=True, logits_to_keep=1)

    memory = MemoryStore(model)
    for d in docs:
        memory.get(d)
    path = Path(args.store or tempfile.mkdtemp(prefix="link_ttft_"))
    store = DocumentStore(path, model, None)
    for d in docs:
        if store.lookup(d) is None:
            store.put(memory.get(d))

    def read_all():
        for d in docs:
            assert store.lookup(d) is not None

    assembled, _ = document_cache(model, None, req, store=memory)
    state = assembled.snapshot()
    q_ids = torch.tensor([question], device=device)
    n_ctx = sum(map(len, docs))
    q_pos = torch.arange(n_ctx, n_ctx + len(question), device=device)[None]

    @torch.inference_mode()
    def prompt_only():  # the question's forward over an already assembled cache: the engine's share of reuse_ms
        assembled.restore(state)
        model(input_ids=q_ids, position_ids=q_pos, past_key_values=assembled, use_cache=True, logits_to_keep=1)

    warm, cold = None, store.drop_page_cache  # run before each timed repeat, outside the clock
    paths = {
        "full_ms": (full, warm),
        "reuse_ms": (lambda: prefill_ids(model, None, req, store=memory), warm),
        "prompt_forward_ms": (prompt_only, warm),
        "prompt_forward_host_ms": (prompt_only, warm),
        "store_read_warm_ms": (read_all, warm),
        "store_read_cold_ms": (read_all, cold),
        "reuse_from_store_warm_ms": (lambda: prefill_ids(model, None, req, store=store), warm),
        "reuse_from_store_cold_ms": (lambda: prefill_ids(model, None, req, store=store), cold),
    }
    # the prompt's forward replaying one captured step (GraphForward), captured by this first call; a failure to
    # capture is recorded (graph_error) and leaves the other paths' timings intact
    step = GraphForward(model, capacity=n_ctx + len(question) + 16, width=len(question))
    graph_error = None
    try:
        prefill_ids(model, None, req, store=memory, graph=step)
        paths["reuse_graph_ms"] = (lambda: prefill_ids(model, None, req, store=memory, graph=step), warm)
    except Exception as e:  # reported in the JSON; the run goes on
        graph_error = f"{type(e).__name__}: {e}"
        print(f"GraphForward failed: {graph_error}")
    if links is not None:
        paths["reuse_links_ms"] = (lambda: prefill_ids(model, None, req, store=memory, links=links), warm)
    for fn, _ in paths.values():
        fn()  # warm-up: kernels, allocator, page cache
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # round robin, so a drift of the machine touches every path alike
        for name, (fn, before) in paths.items():
            if before is not None:
                before()
            runs[name].append(timed(fn, device, host_only=name == "prompt_forward_host_ms"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    doc_bytes = store.stats()["bytes"] / args.docs
    result = {
        "config": args.config, "docs": args.docs, "doc_tokens": args.doc_tokens, "question": args.question,
        "links": args.links, "dtype": str(next(model.parameters()).dtype), "device": device_name(model),
        "commit": git_commit(), "versions": _versions(), "store": str(path), "store_bytes_per_doc": doc_bytes,
        "no_cudnn_sdpa": args.no_cudnn_sdpa, "sdpa": sdpa_backends(),
        "question_attention": question_attention(model, n_ctx, len(question), device),
        "median_ms": med, "runs_ms": runs,
        "speedup_reuse_vs_full": med["full_ms"] / med["reuse_ms"],
        "speedup_reuse_graph_vs_full": med["full_ms"] / med["reuse_graph_ms"] if "reuse_graph_ms" in med else None,
        "graph_error": graph_error,
        "read_GBps_warm": args.docs * doc_bytes / med["store_read_warm_ms"] / 1e6,
        "read_GBps_cold": args.docs * doc_bytes / med["store_read_cold_ms"] / 1e6,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, v in med.items():
        print(f"{k:<28} {v:10.2f}")
    graph_x = result["speedup_reuse_graph_vs_full"]
    print(f"reuse vs full: {result['speedup_reuse_vs_full']:.1f}x (captured prompt step: "
          f"{'failed' if graph_x is None else f'{graph_x:.1f}x'}); store {doc_bytes / 1e6:.1f} MB per document, "
          f"read {result['read_GBps_warm']:.2f} GB/s warm, {result['read_GBps_cold']:.2f} GB/s cold -> {args.out}")


if __name__ == "__main__":
    main()
