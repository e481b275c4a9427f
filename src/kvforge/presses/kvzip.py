"""KVzip: query-agnostic eviction scored by how much the model needs each entry to *reconstruct* its context.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", 2025,
https://arxiv.org/abs/2505.23416 (reference code: snu-mllab/KVzip; this is our own implementation).

After the context is prefilled, the model is asked to repeat it, chunk by chunk (~2000 tokens), with the
chunk itself teacher-forced as the answer. Chunk 0 is prompted with "Repeat the previous context exactly.",
chunk i > 0 with "Repeat the part of the previous context exactly, starting with " + the last 8 tokens of
chunk i − 1. The prompt continues the context's open user turn exactly as a kvforge question does: the
prompt text, then the chat template's end of user turn + assistant prefix (the reference code does the same;
without a chat template the raw text is used). In every compressible layer the repeat queries are
softmaxed (the model's scaling, float32) over [sinks | this chunk's entries | the repeat tokens (causal)];
the chunk columns, maxed over the GQA group and the query positions, give the score of each entry,
`[L_compressible, B, H_kv, n]`. The repeat's KV is rolled back (snapshot / restore) before anything is
removed.

Protected entries (score +inf, never removed, also the softmax sinks): the row's chat-template prefix (the
system prompt and everything before the user content), at least `sink_tokens` first tokens. The question
and generated tokens come after compression and are never touched.

Ratio mapping: kvforge's `compression_ratio` r is the fraction of the *context* entries removed (the
protected prefix excluded); the paper's `ratio` is the fraction kept, i.e. paper ratio = 1 − r. `budget`
(entries per layer and head, prefix included) is accepted too.

Levels: `pair` (one threshold over every layer, head and token of a row: non-uniform head budgets, stored
head-varlen), `pair-uniform` (top-k per head), `head` (offline head scores `[L, H_kv]` from
`head_scores_path`, see `kvforge kvzip-head-scores`: the int((1 − r)·L·H_kv) best heads keep their whole
context, the others keep only the protected prefix (and, later, the question and answer)).
Modes: `evict` removes entries for real (`KVCache.keep_per_head`: packed per-head segments on CUDA, a
padded head-varlen block on CPU; or a dense `keep` when every head keeps the same count); `retain` keeps
everything and masks (`HeadVarlenLayer.restrict`), as the paper's RetainCache. Scores depend only on the
prefilled cache, so they are memoized per prefill buffer: forks of one prefill (`compress_prefilled`, the
eval runner's shared sweeps) run one scoring pass for every ratio, level and mode.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import torch

from kvforge.errors import KVForgeError
from kvforge.presses.base import LayerContext, Press, check_choice, check_int, descending_rank
from kvforge.presses.registry import register
from kvforge.prompt import format_prompt, use_template

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "
LEVELS = ("pair", "pair-uniform", "head")
MODES = ("evict", "retain")
QUERY_BLOCK = 256  # repeat queries scored at once (bounds the [H, G, block, keys] logits)


# ------------------------------------------------------------------------------------------------------
# Prompt pieces
# ------------------------------------------------------------------------------------------------------
def template_parts(tokenizer, chat_template: bool | None) -> tuple[list[int], list[int]]:
    """(ids before the user content, ids closing the user turn + assistant prefix) of the chat template.

    Taken from `format_prompt` with an empty context and question, so they are exactly what kvforge
    builds around contexts and questions. Without a chat template: (special tokens `tokenizer("")` adds,
    no suffix).
    """
    if not use_template(tokenizer, chat_template):
        return list(tokenizer("", add_special_tokens=True)["input_ids"]), []
    head, tail = format_prompt(tokenizer, "", "", chat_template=True, prompt_format="kvforge")
    prefix = tokenizer(head, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(tail[2:], add_special_tokens=False)["input_ids"]  # tail = "\n\n" + question + suffix
    return list(prefix), list(suffix)


def protected_length(row: list[int], prefix: list[int], sink_tokens: int) -> int:
    """Leading tokens of `row` never evicted: the common prefix with the template's prefix, at least
    `sink_tokens` (capped at the row's length)."""
    common = 0
    for a, b in zip(row, prefix):
        if a != b:
            break
        common += 1
    return min(max(common, sink_tokens), len(row))


def repeat_prompts(tokenizer, chunks: list[list[int]], suffix: list[int], prev_tokens: int = 8) -> list[list[int]]:
    """Ids fed for each chunk: repeat instruction (+ the previous chunk's last tokens), template suffix, chunk."""
    first = tokenizer(REPEAT_FIRST, add_special_tokens=False)["input_ids"]
    nxt = tokenizer(REPEAT_NEXT, add_special_tokens=False)["input_ids"]
    out = []
    for i, chunk in enumerate(chunks):
        head = list(first) if i == 0 else list(nxt) + chunks[i - 1][-prev_tokens:]
        out.append(head + list(suffix) + list(chunk))
    return out


@dataclass
class RowPlan:
    """One context row: left padding, protected prefix, and the chunks of the rest."""

    pad: int
    protected: int
    chunks: list[list[int]]
    prompts: list[list[int]]

    @property
    def chunk_starts(self) -> list[int]:  # physical column of each chunk's first entry
        starts, at = [], self.pad + self.protected
        for c in self.chunks:
            starts.append(at)
            at += len(c)
        return starts


def plan_rows(enc, chunk_size: int, sink_tokens: int, prev_tokens: int) -> list[RowPlan]:
    tok = enc.tokenizer
    if tok is None:
        raise KVForgeError("kvzip needs the tokenizer that built the prompts: build enc with kvforge.generate.encode")
    prefix, suffix = template_parts(tok, enc.chat_template)
    plans = []
    width = enc.ctx_ids.shape[1]
    for ids, mask in zip(enc.ctx_ids.tolist(), enc.ctx_mask.tolist()):
        n = int(sum(mask))
        row = ids[width - n :]
        p = protected_length(row, prefix, sink_tokens)
        content = row[p:]
        chunks = [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)]
        plans.append(RowPlan(width - n, p, chunks, repeat_prompts(tok, chunks, suffix, prev_tokens)))
    return plans


# ------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------
def chunk_scores(query: torch.Tensor, keys: torch.Tensor, n_sink: int, n_chunk: int, scaling: float,
                 block: int = QUERY_BLOCK) -> torch.Tensor:
    """KVzip score of a chunk for one row and layer.

    `query [Hq, r, D]` (the r repeat queries), `keys [H_kv, n_sink + n_chunk + r, D]` = [sinks | chunk |
    repeat]. Softmax (float32) of every query over those keys, causal within the repeat; the chunk columns,
    maxed over the GQA group and the queries → `[H_kv, n_chunk]`.
    """
    hq, r, d = query.shape
    h = keys.shape[0]
    g = hq // h
    q = query.reshape(h, g, r, d)
    k = keys.float()
    best = torch.zeros(h, n_chunk, device=keys.device)
    lo = n_sink + n_chunk
    cols = torch.arange(r, device=keys.device)
    for start in range(0, r, block):
        stop = min(start + block, r)
        logits = torch.einsum("hgqd,hkd->hgqk", q[:, :, start:stop].float(), k) * scaling
        future = cols[None, :] > torch.arange(start, stop, device=keys.device)[:, None]  # [q, r]
        logits[..., lo:] = logits[..., lo:].masked_fill(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)[..., n_sink:lo]
        best = torch.maximum(best, probs.amax(dim=(1, 2)))
    return best


@torch.inference_mode()
def kvzip_scores(model, cache, enc, chunk_size: int = 2000, sink_tokens: int = 4, prev_tokens: int = 8,
                 plans: list[RowPlan] | None = None) -> torch.Tensor:
    """Context-reconstruction scores of every stored entry, `[L_compressible, B, H_kv, W]` (W = padded
    context width). Protected entries score +inf, padding −inf. The cache must hold exactly the prefilled,
    unpruned contexts of `enc`; it is returned to that state (the repeat's KV never stays)."""
    plans = plans if plans is not None else plan_rows(enc, chunk_size, sink_tokens, prev_tokens)
    layers = cache.compressible_layers()
    b, width = enc.ctx_ids.shape
    for i in layers:
        layer = cache.layers[i]
        if getattr(layer, "slots", None) is not None or layer.entry_valid() is not None or layer.n != width:
            raise KVForgeError("kvzip scores a freshly prefilled, unpruned cache (is another press composed first?)")
    first = cache.layers[layers[0]]
    h = first.keys.shape[1]
    device = first.keys.device
    scores = torch.zeros(len(layers), b, h, width, device=device)
    real = enc.ctx_mask.bool().to(device)
    protected = torch.zeros(b, width, dtype=torch.bool, device=device)
    for row, p in enumerate(plans):
        protected[row, p.pad : p.pad + p.protected] = True
    scores.masked_fill_(protected[None, :, None, :], float("inf"))
    scores.masked_fill_(~real[None, :, None, :], float("-inf"))
    rank_of = {idx: r for r, idx in enumerate(layers)}

    n_chunks = max((len(p.chunks) for p in plans), default=0)
    saved = (cache.observer, cache.press, cache.recorded, cache.armed)
    try:
        cache.press, cache.recorded, cache.armed = None, None, False
        for c in range(n_chunks):
            rows = [(row, p) for row, p in enumerate(plans) if c < len(p.chunks)]
            prompts = [plans[row].prompts[c] if c < len(plans[row].chunks) else [] for row in range(b)]
            rwidth = max(len(x) for x in prompts)
            ids = torch.full((b, rwidth), enc.pad_id, dtype=torch.long)
            rmask = torch.zeros((b, rwidth), dtype=torch.long)
            for row, x in enumerate(prompts):  # right-padded: real repeat queries never see the padding
                ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                rmask[row, : len(x)] = 1
            ids, rmask = ids.to(enc.ctx_ids.device), rmask.to(enc.ctx_ids.device)
            mask = torch.cat([enc.ctx_mask, rmask], dim=1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, width:]

            def observe(ctx: LayerContext, c=c, rows=rows, prompts=prompts):
                keys = ctx.layer.keys  # [B, H, width + rwidth, D]: context entries then the repeat
                for row, p in rows:
                    r = len(prompts[row])
                    s0, c0 = p.pad, p.chunk_starts[c]
                    cl = len(p.chunks[c])
                    k = torch.cat([keys[row, :, s0 : s0 + p.protected], keys[row, :, c0 : c0 + cl],
                                   keys[row, :, width : width + r]], dim=1)
                    sc = chunk_scores(ctx.query[row, :, :r], k, p.protected, cl, ctx.scaling)
                    scores[rank_of[ctx.layer_idx], row, :, c0 : c0 + cl] = sc

            state = cache.snapshot()
            cache.observer = observe
            try:
                model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
            finally:
                cache.observer = None
                cache.restore(state)
    finally:
        cache.observer, cache.press, cache.recorded, cache.armed = saved
    return scores


# Scores of a prefill, keyed by the id of its first compressible layer's key buffer (shared by every fork
# of that prefill; a weak reference drops the entry when the buffer is freed).
_MEMO: dict[int, tuple] = {}


def _memo_key(cache) -> torch.Tensor:
    return cache.layers[cache.compressible_layers()[0]].storage


def _memo_get(cache, params: tuple, enc) -> torch.Tensor | None:
    buf = _memo_key(cache)
    hit = _MEMO.get(id(buf))
    if hit is None or hit[0]() is not buf or hit[1] != params or not torch.equal(hit[2], enc.ctx_ids):
        return None
    return hit[3]


def _memo_put(cache, params: tuple, enc, scores: torch.Tensor) -> None:
    buf = _memo_key(cache)
    key = id(buf)
    _MEMO[key] = (weakref.ref(buf, lambda _ref, key=key: _MEMO.pop(key, None)), params, enc.ctx_ids.clone(), scores)


def load_head_scores(path: str) -> torch.Tensor:
    """Head scores `[L_compressible, H_kv]` from a JSON file written by `kvforge kvzip-head-scores`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return torch.tensor(data["scores"] if isinstance(data, dict) else data, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KVForgeError(f"kvzip: cannot read head scores from {path!r}: {e}") from None


# ------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------
def select(scores: torch.Tensor, real: torch.Tensor, protected: torch.Tensor, level: str,
           compression_ratio: float | None, budget: int | None = None,
           head_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Entries kept, bool `[L, B, H, W]`, from scores `[L, B, H, W]` (`real`, `protected`: `[B, W]`).

    Per row: e = real, unprotected entries; per head, `k = int(e·(1 − r))` context entries are kept on
    average (with `budget`: `budget − protected`, clamped to [0, e]); protected entries always.
    `pair`: the k·L·H best entries of the row over all layers and heads; `pair-uniform`: the k best of
    every head; `head`: the int(L·H·(1 − r)) best heads (by `head_scores [L, H]`) keep all their entries.
    """
    n_l, b, h, w = scores.shape
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(b):
        prot = protected[row]
        e = int((real[row] & ~prot).sum())
        s = int(prot.sum())
        if budget is not None:
            k = min(max(budget - s, 0), e)
            frac = k / e if e else 0.0
        else:
            k = int(e * (1.0 - compression_ratio))
            frac = 1.0 - compression_ratio
        sc = scores[:, row].float().masked_fill(~real[row], float("-inf")).masked_fill(prot, float("inf"))
        if level == "pair":
            rank = descending_rank(sc.reshape(1, -1)).reshape(n_l, h, w)
            kept = rank < (k + s) * n_l * h
        elif level == "pair-uniform":
            kept = descending_rank(sc) < k + s
        else:
            heads = int(n_l * h * frac)
            hrank = descending_rank(head_scores.float().reshape(1, -1)).reshape(n_l, h)
            kept = (hrank < heads)[:, :, None] | prot
        keep[:, row] = kept & real[row]
    return keep


def _dense_keep(layer, keep: torch.Tensor, real: torch.Tensor) -> bool:
    """Apply `keep [B, H, W]` as a dense `keep` (same count in every head of a row; `real [B, W]`); False when
    heads differ or a row lacks the padding entries needed to fill up to the widest row."""
    counts = keep.sum(-1)  # [B, H]
    if bool((counts != counts[:, :1]).any()):
        return False
    kmax = int(counts.max())
    room = (~real).sum(-1)  # padding entries that can fill shorter rows, [B]
    if bool(((kmax - counts[:, 0]) > room).any()):
        return False
    filler = ~real[:, None, :].expand_as(keep)
    priority = keep.to(torch.int8) * 2 + filler.to(torch.int8)
    idx = priority.topk(kmax, dim=-1, sorted=False).indices.sort(-1).values
    layer.keep(idx)
    return True


# ------------------------------------------------------------------------------------------------------
# The press
# ------------------------------------------------------------------------------------------------------
@register("kvzip")
@dataclass
class KVzipPress(Press):
    """Context-reconstruction scores `[L, B, H_kv, n]` from one extra teacher-forced pass per ~2000-token
    chunk, then `level` selection (`pair` | `pair-uniform` | `head`), `mode` `evict` or `retain`."""

    frees_memory = "evict: yes (packed per head on CUDA, padded on CPU); retain: no (masks)"
    extra_passes = "1 repeat pass per 2k-token chunk (about 3.4x prefill)"
    paper = "https://arxiv.org/abs/2505.23416"

    level: str = "pair"
    mode: str = "evict"
    chunk_size: int = 2000
    sink_tokens: int = 4
    prev_tokens: int = 8
    head_scores_path: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "level", self.level, LEVELS)
        check_choice(self, "mode", self.mode, MODES)
        if self.level == "head" and not self.head_scores_path:
            raise KVForgeError("kvzip: level='head' needs head_scores_path (see `kvforge kvzip-head-scores`)")
        check_int(self, "chunk_size", self.chunk_size, minimum=1)
        check_int(self, "sink_tokens", self.sink_tokens, minimum=0)
        check_int(self, "prev_tokens", self.prev_tokens, minimum=0)

    def compress(self, ctx: LayerContext) -> None:
        """No-op: KVzip needs its extra pass over the whole prefilled cache (`after_prefill`)."""

    def _noop(self, enc) -> bool:
        if self.budget is not None:
            return self.budget >= int(enc.ctx_mask.sum(-1).max())
        return self.compression_ratio == 0.0

    def scores(self, model, cache, enc, plans: list[RowPlan] | None = None) -> torch.Tensor:
        """Scores `[L, B, H_kv, W]` of the prefilled `cache`, memoized per prefill."""
        params = (self.chunk_size, self.sink_tokens, self.prev_tokens)
        hit = _memo_get(cache, params, enc)
        if hit is None:
            hit = kvzip_scores(model, cache, enc, self.chunk_size, self.sink_tokens, self.prev_tokens, plans)
            _memo_put(cache, params, enc, hit)
        return hit

    def after_prefill(self, model, cache, enc) -> None:
        if self._noop(enc):
            return  # nothing removed: leave the cache untouched (equals plain generation)
        plans = plan_rows(enc, self.chunk_size, self.sink_tokens, self.prev_tokens)
        layers = cache.compressible_layers()
        device = cache.layers[layers[0]].keys.device
        b, width = enc.ctx_ids.shape
        real = enc.ctx_mask.bool().to(device)
        protected = torch.zeros(b, width, dtype=torch.bool, device=device)
        for row, p in enumerate(plans):
            protected[row, p.pad : p.pad + p.protected] = True
        head_scores = None
        if self.level == "head":
            head_scores = load_head_scores(self.head_scores_path).to(device)
            h = cache.layers[layers[0]].keys.shape[1]
            if tuple(head_scores.shape) != (len(layers), h):
                raise KVForgeError(f"kvzip: head scores in {self.head_scores_path!r} have shape "
                                   f"{tuple(head_scores.shape)}; this model needs ({len(layers)}, {h})")
            scores = torch.zeros(len(layers), b, h, width, device=device)
        else:
            scores = self.scores(model, cache, enc, plans)
        cache.kvzip_scores = scores
        keep = select(scores, real, protected, self.level, self.compression_ratio, self.budget, head_scores)
        real_h = real[:, None, :]
        for rank, idx in enumerate(layers):
            k = keep[rank] & real_h
            if self.mode == "retain":
                cache.to_head_varlen(idx).restrict(k)
            elif self.level == "pair-uniform" and _dense_keep(cache.layers[idx], k, real):
                continue
            else:  # head-varlen: packed segments on CUDA, a padded block with validity on CPU
                cache.keep_per_head(idx, k)
