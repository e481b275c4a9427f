"""Decode steps captured in one CUDA graph: per-token launch overhead disappears.

A decode step of an 8B model launches hundreds of small kernels; eager PyTorch spends more time launching
them than the GPU spends reading the weights and the cache. `GraphDecoder` switches every compressible layer
to *graph mode* (write position and segment lengths kept in device tensors, static buffers), runs one eager
step, captures the next forward of the whole model, and then replays it once per token.

Quantized layers whose code grows while decoding (KIVI, GEAR, KVQuant: a group of entries is coded each time the
full-precision tail passes residual + group) code exactly as eager decoding does: the step that codes runs
eagerly, outside the graph, and the next step is captured again (every `group_size` tokens). KIVI's codes are read
by the fused kernel; other codes (GEAR, KVQuant, channel-pruned, merged) are decoded inside the captured step,
one layer at a time (`CodedLayer.graph_block`).

Limits: one token per step, no padding entries in the cache (`kvforge.generate.graph_generate` drops a padded
batch's from kvforge layers; stock sliding-window layers, run as rings, must be unpadded), no decode-time press
hooks.
"""

from __future__ import annotations

import os
import sys

import torch
from torch._dynamo import maybe_mark_dynamic  # torch's documented dynamic-shape marker (no public alias in 2.13)
from torch._dynamo.exc import TorchDynamoException
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvforge.cache.coded import CodedLayer
from kvforge.cache.kvcache import GRAPH_STEP, KVCache
from kvforge.cache.layers import DenseLayer
from kvforge.cache.ring import RingLayer
from kvforge.config import text_config
from kvforge.errors import KVForgeError

try:  # frees cuBLAS's per-stream workspaces (CUDA builds only); see `release_workspaces`
    from torch._C import _cuda_clearCublasWorkspaces
except ImportError:
    _cuda_clearCublasWorkspaces = None

AUTOTUNE = "max-autotune-no-cudagraphs"  # inductor tunes its own GEMMs (we capture the graph ourselves)
COMPILE_MODES = ("auto", "off", "on", "max-autotune")


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream per GPU on which every eager warm-up step and every capture of kvforge runs.

    cuBLAS keeps a workspace (32 MiB on an H100) for each stream it has run on, for the life of the process, so a new
    stream per captured step leaves one more workspace allocated after each decoder (the likely reason the rows of one
    `kvforge bench` run on an H100 peaked 0.03-0.04 GB higher each, row after row, 2026-12-07)."""
    idx = torch.cuda.current_device() if device.index is None else device.index
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


def release_workspaces() -> None:
    """Free cuBLAS's cached per-stream workspaces (CUDA; nothing elsewhere). The next GEMM on a stream allocates its
    workspace again, so a measured peak holds only the workspaces of what is measured."""
    if _cuda_clearCublasWorkspaces is not None and torch.cuda.is_available():
        _cuda_clearCublasWorkspaces()


def resolve_compile(compile: bool | str, device: torch.device) -> bool | str:
    """What `GraphDecoder(compile=...)` gets for a user's setting: "auto" (the default of `kvforge.generate` and
    `kvforge bench`) is inductor's max-autotune on CUDA and nothing elsewhere, unless `KVFORGE_COMPILE` says
    otherwise (off, on, max-autotune); "on" / True is inductor's default mode, "off" / False no compilation, a mode
    name passes through. On CUDA, compiled steps keep inductor's caches in `$KVFORGE_CACHE/inductor` (unless the
    user set `TORCHINDUCTOR_CACHE_DIR`; inductor's default is a temporary directory): the tuning of a model's shapes
    is paid once per machine, not per run."""
    if compile == "auto":
        compile = os.environ.get("KVFORGE_COMPILE", "max-autotune" if device.type == "cuda" else "off")
        if compile not in COMPILE_MODES[1:]:
            raise KVForgeError(f"KVFORGE_COMPILE={compile!r}; allowed: {', '.join(COMPILE_MODES[1:])}")
    compile = {"off": False, "on": True, "max-autotune": AUTOTUNE}.get(compile, compile) if isinstance(
        compile, str) else bool(compile)
    if compile and device.type == "cuda" and os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _inductor_default()):
        from kvforge.models import cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")  # read by inductor at each use
    return compile


def _inductor_default() -> str | None:
    """Inductor's own cache directory (a temporary one), which importing inductor writes into the environment: a
    value equal to it was not chosen by the user."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return default_cache_dir()


_ANNOUNCED: set = set()


def _announce(mode) -> None:
    """One line on stderr, once per process and mode, before the first compilation (it can take minutes)."""
    if mode in _ANNOUNCED:
        return
    _ANNOUNCED.add(mode)
    where = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "inductor's default cache")
    print(f"kvforge: compiling the decode step ({mode if isinstance(mode, str) else 'default'}): minutes the first "
          f"time for a model's shapes on this GPU, then read from {where}; KVFORGE_COMPILE=off skips it",
          file=sys.stderr, flush=True)


def _stock_sliding(layer) -> bool:
    """transformers' sliding-window layer, initialised and not recording its past (a ring serves it)."""
    return (isinstance(layer, DynamicSlidingWindowLayer) and layer.is_initialized and not layer.record_past
            and layer.keys is not None)


class GraphDecoder:
    """Greedy-friendly decoder: `step(token [B, 1]) -> logits [B, vocab]`, one captured forward per call.

    Args:
        model: the model (on CUDA; on CPU the same code runs eagerly, without capture — used by tests).
        cache: a prefilled (and compressed) `KVCache`, disarmed.
        position: the position id of the first token to be fed (an int, or a tensor `[B]`, one per row).
        steps: the most tokens that will be fed (the layers' spare room must hold them).
        compile: run the step through `torch.compile(fullgraph=True)` before capture (inductor fuses the
            model's small elementwise kernels — RMSNorm, RoPE, residual adds — that dominate the non-KV time of a
            captured step; measured in benchmarks/README.md); the first step pays the compilation. The step traces
            as one graph that never recompiles while decoding (graph mode keeps every host value it reads constant);
            plain layers' KV length is a symbol in it, so inductor's on-disk cache serves later decoders of any
            context length.
            A string is passed as the inductor mode (e.g. "max-autotune-no-cudagraphs": tuned Triton GEMMs).
            `close()` then calls `torch.compiler.reset()` — process-wide: other compiled code recompiles on its
            next call — so that successive decoders neither hit dynamo's recompile limit nor keep old caches.
    """

    @staticmethod
    def unsupported(cache: KVCache) -> str | None:
        """Why `cache` cannot be decoded in graph mode, or None when it can."""
        cfg = text_config(cache.config)
        if getattr(cfg, "attn_logit_softcapping", None) is not None or getattr(cfg, "model_type", None) == "gpt_oss":
            return ("attention logit soft-capping (Gemma 2) and sink logits (gpt-oss) run eagerly; graph decoding "
                    "has no kernel for them")
        if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
            # measured on an H100 (2026-12-07): transformers' grouped_mm experts copy from the host while captured
            return ("a mixture-of-experts model routes tokens with host copies that a CUDA graph cannot capture; "
                    "it decodes eagerly")
        if cache.press is not None and cache.press.acts_while_decoding:
            return f"{cache.press.name} acts during decoding; it cannot run inside a CUDA graph"
        if not all(isinstance(layer, DenseLayer) or _stock_sliding(layer) for layer in cache.layers):
            return "graph decoding needs kvforge layers or transformers' sliding-window layers"
        if cache.observer is not None:
            return "an observer reads every forward; graph decoding runs none"
        return None

    def __init__(self, model, cache: KVCache, position: int | torch.Tensor, steps: int, batch: int,
                 compile: bool | str = False):
        why = self.unsupported(cache)
        if why:
            raise KVForgeError(why)
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.capture = device.type == "cuda"
        self.rings: dict[int, RingLayer] = {}  # stock sliding-window layers, swapped for rings while decoding
        self.steps, self.fed = steps, 0
        self._enter_graph_mode(steps)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        if isinstance(position, torch.Tensor):  # one per row (left-padded batches: real tokens before each)
            self.pos = position.reshape(batch, 1).to(device=device, dtype=torch.long).clone()
        else:
            self.pos = torch.full((batch, 1), position, dtype=torch.long, device=device)
        self.graph = None
        if device.type == "cuda":
            from kvforge.kernels.decode import sm_count

            sm_count(device)  # cached before tracing
        # the class's function, not a bound method: a bound method stored on self is a reference cycle, and the
        # cache (all of the KV) would then live until the garbage collector happens to run
        mode = compile if isinstance(compile, str) else None  # e.g. "max-autotune-no-cudagraphs"
        self.compile = compile
        self._step = None
        if compile:
            self._mark_lengths_dynamic()
            self._step = torch.compile(GraphDecoder._step_body, dynamic=None, fullgraph=True, mode=mode)

    def _mark_lengths_dynamic(self) -> None:
        """Let the compiled step take the length of plain layers' buffers as a symbol: their attention reads it from
        the shapes at run time (`dense_decode_attention`), so the traced step, and inductor's cached compilation
        of it, serve every context length. Everything else stays static."""
        for layer in self.cache.layers:
            if type(layer) is DenseLayer:
                for t in layer.length_tensors():
                    maybe_mark_dynamic(t, 2)

    def _enter_graph_mode(self, steps: int) -> None:
        with torch.inference_mode():  # the buffers are inference tensors (prefilled under inference_mode)
            try:
                for i, layer in enumerate(self.cache.layers):
                    if _stock_sliding(layer):
                        self.rings[i] = self.cache.layers[i] = RingLayer.from_stock(layer, steps)
                    else:
                        layer.enter_graph_mode(steps)
            except Exception:  # e.g. too little spare room: leave no layer half in graph mode
                self._leave_graph_mode()
                raise

    def _codes_next(self) -> bool:
        """True when the next token makes a quantized layer code a group."""
        return any(isinstance(layer, CodedLayer) and layer.codes_on_next_append() for layer in self.cache.layers)

    def _eager_step(self) -> torch.Tensor:
        """One step outside graph mode (the layers' own update path, which codes), then graph mode again."""
        self._leave_graph_mode()
        self.graph = None  # the next step warms up and captures again
        logits = self.model(input_ids=self.tok, position_ids=self.pos.clone(), past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        self.pos += 1
        self._enter_graph_mode(self.steps - self.fed)
        return logits

    def _step_body(self) -> torch.Tensor:
        out = self.model(input_ids=self.tok, position_ids=self.pos, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        self.pos += 1
        return out.logits[:, -1]

    def _forward(self) -> torch.Tensor:
        GRAPH_STEP.cache = self.cache
        try:
            return self._step_body() if self._step is None else self._step(self)
        finally:
            GRAPH_STEP.cache = None

    def _first_forward(self) -> torch.Tensor:
        """The first (warm-up) step: where a compiled step compiles. A compiler failure (dynamo's or a backend's,
        raised while tracing or compiling, before the step runs and writes anything) is reported in one line and the
        step runs uncompiled from then on; an error while the compiled step runs is raised."""
        if self._step is None:
            return self._forward()
        _announce(self.compile)
        try:
            return self._forward()
        except TorchDynamoException as e:  # the uncompiled step is the same computation
            print(f"kvforge: compiling the decode step failed ({type(e).__name__}: {str(e)[:200]}); decoding "
                  "without compilation", file=sys.stderr, flush=True)
            self._step = None
            torch.compiler.reset()
            return self._forward()

    def _advance(self) -> None:
        for layer in self.cache.layers:
            layer.advance(1)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(token)
        self.fed += 1
        if self._codes_next():
            return self._eager_step()
        if self.graph is None:
            if not self.capture:  # CPU: graph mode runs eagerly (same kernels' twins, same device counters)
                logits = self._first_forward() if self.fed == 1 else self._forward()
                self._advance()
                return logits
            stream = side_stream(self.tok.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # the first step runs eagerly (warms up), then the next is captured
                logits = self._first_forward()
            torch.cuda.current_stream().wait_stream(stream)
            self._advance()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream):
                self.logits = self._forward()
            return logits
        self.graph.replay()
        self._advance()
        return self.logits

    def _leave_graph_mode(self) -> None:
        for i, layer in enumerate(self.cache.layers):
            if i in self.rings:
                self.cache.layers[i] = self.rings[i].to_stock()
            elif isinstance(layer, DenseLayer):
                layer.exit_graph_mode()
        self.rings = {}

    def close(self) -> None:
        self._leave_graph_mode()
        self.graph = None
        if self._step is not None:
            # compiled code is cached per code object with guards on this decoder: drop it, so later decoders
            # neither pile up against dynamo's recompile limit nor keep references to this cache
            torch.compiler.reset()


class GraphForward:
    """One captured forward of `width` new tokens over a cache whose contents change between calls: KVLink's
    question step, where the documents (the cache) change with every request and the question's length does not.

    `run(source, ids, position)` copies the layers of `source` (plain full-attention layers, e.g. documents placed by
    `kvforge.link`) into static buffers of `capacity` entries (allocated on the first call from its shapes), feeds
    `ids [B, width]` at positions `position..position + width − 1` and returns the last token's logits `[B, vocab]`;
    `self.cache` then holds the whole sequence, in normal (not graph) mode, until the next call. The first call runs
    the step eagerly and captures it; later calls copy and replay (on CPU every call runs the same graph-mode step
    eagerly). Each new token attends every stored entry before it (the ordinary causal forward), by the device-side
    length, so one captured step serves every context length up to `capacity − width`.
    """

    def __init__(self, model, capacity: int, width: int):
        if width < 1 or capacity <= width:
            raise KVForgeError(f"GraphForward(capacity={capacity}, width={width}): need width >= 1 and "
                               "capacity > width")
        self.model, self.capacity, self.width = model, capacity, width
        self.cache: KVCache | None = None
        self.graph = None
        self.graphs: list[dict] = []
        self.tok = self.pos = self.logits = None
        self.buffers: list = []

    def _check(self, source: KVCache, ids: torch.Tensor) -> int:
        if ids.dim() != 2 or ids.shape[1] != self.width:
            raise KVForgeError(f"GraphForward of width {self.width}: ids of shape {tuple(ids.shape)}; allowed: "
                               f"[batch, {self.width}]")
        ns = set()
        for i, layer in enumerate(source.layers):
            if type(layer) is not DenseLayer or layer.slots is not None:
                raise KVForgeError(f"GraphForward needs plain full-attention layers (entry t = position t); layer {i} "
                                   f"is {type(layer).__name__}{' with slots' if type(layer) is DenseLayer else ''}")
            ns.add(layer.n)
        if len(ns) != 1 or next(iter(ns)) + self.width > self.capacity:
            raise KVForgeError(f"GraphForward: layers hold {sorted(ns)} entries; allowed: one count, at most "
                               f"{self.capacity - self.width} (capacity {self.capacity} − width {self.width})")
        return ns.pop()

    @torch.inference_mode()
    def run(self, source: KVCache, ids: torch.Tensor, position: int) -> torch.Tensor:
        n = self._check(source, ids)
        moved = self.cache is not None and any(a.storage is not b for a, b in zip(self.cache.layers, self.buffers))
        if moved:
            self.cache, self.graph, self.graphs = None, None, []  # decoding past capacity reallocated: start again
        first = self.cache is None
        if first:  # static buffers of `capacity` entries; unused slots zeroed (masked slots must be finite)
            layers = []
            for layer in source.layers:
                k, v = layer.keys, layer.values
                new = DenseLayer.from_entries(k, v, reserve=self.capacity - n)
                new.zero_spare_()
                layers.append(new)
            self.cache = KVCache.from_layers(self.model, layers)
            self.buffers = [layer.storage for layer in layers]
            self.tok = ids.clone()
            self.pos = torch.arange(position, position + self.width, device=ids.device).expand_as(ids).clone()
        else:
            if ids.shape[0] != self.tok.shape[0]:
                raise KVForgeError(f"GraphForward was built for batch {self.tok.shape[0]}; got {ids.shape[0]}")
            for dst, src in zip(self.cache.layers, source.layers):
                dst.load_(src.keys, src.values)
            self.tok.copy_(ids)
            self.pos.copy_(torch.arange(position, position + self.width, device=ids.device).expand_as(ids))
        layers = self.cache.layers
        if not self.graphs:
            for layer in layers:
                layer.enter_graph_mode(self.width)
            self.graphs = [layer.graph for layer in layers]
        else:  # the same device tensors the captured step reads, set to this context's length
            for layer, g in zip(layers, self.graphs):
                layer.graph = g
                for key in ("pos", "logical", "lengths"):
                    g[key].fill_(n)
        try:
            if self.graph is not None:
                self.graph.replay()
                logits = self.logits.clone()  # the static output is overwritten by the next replay
            elif first and ids.is_cuda:
                stream = side_stream(ids.device)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # this call's answer, eagerly (and the warm-up)
                    logits = self._forward()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()  # recorded, not run: the device state stays as the warm-up left it
                with torch.cuda.graph(graph, stream=stream):
                    self.logits = self._forward()
                self.graph = graph  # only a complete capture is ever replayed
            else:
                logits = self._forward()
        finally:
            for layer in layers:
                layer.exit_graph_mode()
        for layer in layers:  # host bookkeeping: the step wrote `width` entries
            layer.advance(self.width)
        return logits

    def _forward(self) -> torch.Tensor:
        GRAPH_STEP.cache = self.cache
        try:
            out = self.model(input_ids=self.tok, position_ids=self.pos, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
            return out.logits[:, -1]
        finally:
            GRAPH_STEP.cache = None
