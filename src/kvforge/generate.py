"""`generate()`: compress a context once, answer several questions from the same compressed cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvforge.cache.kvcache import KVCache, check_chunking, check_press
from kvforge.config import text_config
from kvforge.errors import KVForgeError, check_count
from kvforge.prompt import (  # noqa: F401  (re-exported)
    DEFAULT_PROMPT_FORMAT,
    PROMPT_FORMATS,
    check_prompt_format,
    encode_prompt,
    format_prompt,
    use_template,
)


def model_max_length(model) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def chunk_bounds(length: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """`[start, stop)` ranges of a prefill of `length` tokens in chunks of `chunk_size`, cut from the end (the
    first chunk is the short one), so left padding shifts no boundary: a row is chunked the same alone or in a
    batch. One range when `chunk_size` is None or covers the length."""
    if chunk_size is None or chunk_size >= length:
        return [(0, length)]
    return [(max(0, stop - chunk_size), stop) for stop in range(length, 0, -chunk_size)][::-1]


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the context through the model into `cache` (compressing it if the cache is armed).

    Position ids follow `generate()`'s rule (cumulative sum of the mask), so left padding is exact.
    A cache built with `chunk_size` is fed that many tokens at a time (`chunk_bounds`), each chunk attending to the
    cache so far; an armed cache is re-armed before each chunk, so its press compresses every chunk right after its
    attention. Returns the last position's logits `[B, vocab]`.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    armed = cache.armed
    for i, (start, stop) in enumerate(chunk_bounds(input_ids.shape[1], cache.chunk_size)):
        if armed and i:
            cache.arm()
        out = model(
            input_ids=input_ids[:, start:stop],
            attention_mask=attention_mask[:, :stop],
            position_ids=position_ids[:, start:stop],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return out.logits[:, -1]


@dataclass
class Encoded:
    """A batch of contexts (left-padded ids `[B, L]` and mask) and, per context, the ids of each question."""

    ctx_ids: torch.Tensor
    ctx_mask: torch.Tensor
    q_rows: list[list[list[int]]]
    pad_id: int
    # how the prompts were built (presses with extra passes, e.g. KVzip, phrase their own prompts alike)
    tokenizer: object = None
    chat_template: bool | None = None
    prompt_format: str = DEFAULT_PROMPT_FORMAT

    @property
    def longest_question(self) -> int:
        return max((len(r) for row in self.q_rows for r in row), default=0)


def encode(model, tokenizer, contexts: list[str], questions: list[list[str]], answer_prefix: str | list[str] = "",
           chat_template: bool | None = None, max_new_tokens: int = 0,
           prompt_format: str = DEFAULT_PROMPT_FORMAT) -> Encoded:
    """Tokenize contexts and questions (see `encode_prompt`) and check they fit the model's window.
    `answer_prefix`: one for every context, or a list with one per context."""
    check_prompt_format(prompt_format)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefixes = [answer_prefix] * len(contexts) if isinstance(answer_prefix, str) else list(answer_prefix)
    if len(prefixes) != len(contexts):
        raise KVForgeError(f"got {len(prefixes)} answer prefixes for {len(contexts)} contexts; give one string or "
                           "one per context")
    enc = [[encode_prompt(tokenizer, c, q, prefix, chat_template, prompt_format) for q in row]
           for c, row, prefix in zip(contexts, questions, prefixes)]
    ctx_rows = [row[0][0] if row else encode_prompt(tokenizer, c, "", "", chat_template, prompt_format)[0]
                for c, row in zip(contexts, enc)]
    q_rows = [[q for _, q in row] for row in enc]
    longest_q = max((len(r) for row in q_rows for r in row), default=0)
    limit = model_max_length(model)
    longest = max(len(r) for r in ctx_rows)
    if limit and longest + longest_q + max_new_tokens > limit:
        raise KVForgeError(
            f"context of {longest} tokens + question of {longest_q} + max_new_tokens={max_new_tokens} exceeds "
            f"the model's maximum of {limit} tokens; shorten the context"
        )
    ctx_ids, ctx_mask = _left_pad(ctx_rows, pad_id, device)
    return Encoded(ctx_ids, ctx_mask, q_rows, pad_id, tokenizer, use_template(tokenizer, chat_template),
                   prompt_format)


def answer(model, tokenizer, cache: KVCache, enc: Encoded, max_new_tokens: int,
           cuda_graph: bool = False, compile: bool | str = False) -> list[list[str]]:
    """Greedy answers to every question of `enc` from `cache` (which holds the prefilled contexts).

    The cache is restored after each question, so answers never see each other. `cuda_graph=True` decodes
    each answer by replaying one captured step per token (`graph_generate`; on CPU the same steps run uncaptured;
    a padded batch's padding entries are dropped first) when the cache allows it (kvforge layers only, no press
    acting while decoding), otherwise through transformers' `generate`. `compile`: how that step is compiled
    (`kvforge.cache.graphs.resolve_compile`; "auto": max-autotune on CUDA, its tuning cached on disk; off here by
    default: evaluations decode short answers from many caches, where tracing each decoder costs more than it
    saves; `kvforge.generate` defaults to "auto").
    Off by default: on CUDA its attention kernel rounds differently from SDPA in bf16, so "no press == plain
    `generate()`" holds exactly only on the default path.
    """
    from kvforge.cache.graphs import GraphDecoder

    state = cache.snapshot()
    answers: list[list[str]] = [[] for _ in enc.q_rows]
    device = enc.ctx_ids.device
    use_graph = cuda_graph and GraphDecoder.unsupported(cache) is None
    for j in range(len(enc.q_rows[0])):
        q_ids, q_mask = _left_pad([row[j] for row in enc.q_rows], enc.pad_id, device)
        if use_graph and q_ids.shape[1]:
            new = graph_generate(model, cache, q_ids, enc.ctx_ids.shape[1], max_new_tokens, enc.pad_id,
                                 mask=torch.cat([enc.ctx_mask, q_mask], dim=1), compile=compile)
            cache.restore(state)  # answered, or no room for graph steps: the question is fed again below
            if new is not None:
                for i, row in enumerate(new):
                    answers[i].append(tokenizer.decode(row, skip_special_tokens=True).strip())
                continue
        ids = torch.cat([enc.ctx_ids, q_ids], dim=1)
        mask = torch.cat([enc.ctx_mask, q_mask], dim=1)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=enc.pad_id,
            )
        for i, row in enumerate(out[:, ids.shape[1] :]):
            answers[i].append(tokenizer.decode(row, skip_special_tokens=True).strip())
        cache.restore(state)
    return answers


@torch.inference_mode()
def graph_generate(model, cache: KVCache, q_ids: torch.Tensor, position: int, max_new_tokens: int,
                   pad_id: int, mask: torch.Tensor | None = None, compile: bool | str = False
                   ) -> torch.Tensor | None:
    """Greedy decoding of `max_new_tokens` after the question ids `q_ids [B, q]` (fed at `position`, the
    cache's length), one captured step per token (`GraphDecoder`), with `generate()`'s stopping rule: a row
    that produced an end-of-sequence id continues with `pad_id`, and decoding stops once every row has.

    `mask [B, position + q]` (1 = real token) for a left-padded batch: positions follow `generate()`'s rule
    and, after the question, the padding entries are dropped from every layer (each row keeps only its real
    tokens, per-row lengths as head-varlen segments), since a graph step attends everything stored.
    Returns the new ids `[B, <= max_new_tokens]`, or None when graph decoding does not fit this cache (no
    room, or entries that cannot be dropped: `KVCache.drop_positions`); the question was fed: restore the cache
    before another attempt.
    """
    from kvforge.cache.graphs import GraphDecoder, resolve_compile

    b, q = q_ids.shape
    if mask is None or bool(mask.all()):
        pos = torch.arange(position, position + q, device=q_ids.device).expand(b, q)
        mask, nxt = None, position + q
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, position:]
        nxt = mask.sum(-1)
    logits = model(input_ids=q_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    try:
        if mask is not None:
            cache.drop_positions(~mask.bool())
        dec = GraphDecoder(model, cache, nxt, max(max_new_tokens - 1, 1), b,
                           compile=resolve_compile(compile, q_ids.device))
    except (ValueError, KVForgeError):
        return None
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=q_ids.device)
    tok = logits.argmax(-1, keepdim=True)
    out, done = [tok], torch.isin(tok, eos)
    try:
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            tok = torch.where(done, pad_id, dec.step(tok).argmax(-1, keepdim=True))
            out.append(tok)
            done |= torch.isin(tok, eos)
    finally:
        dec.close()
    return torch.cat(out, 1)


def answer_query_aware(model, tokenizer, enc: Encoded, press, max_new_tokens: int,
                       packed: bool | None = None) -> tuple[list[list[str]], KVCache]:
    """Query-aware answers (SnapKV's original setting): for each question, prefill context + question together
    into a fresh cache compressed by `press`, so the scored window (SnapKV's last tokens) covers the question,
    then generate the answer directly after.

    Each question needs its own prefill and compression — the cost of query-awareness, and the setting KVzip's
    paper argues against (a cache compressed for one question serves the next ones badly). Each row is its
    context + question, left-padded as one prompt, so a row gives the same answer alone or in a batch.
    Returns the answers and the last question's cache.
    """
    if press is not None and press.has_extra_pass:
        raise KVForgeError(f"{press.name} scores the context with extra passes (query-agnostic by design); "
                           "query_aware=True is not supported for it")
    answers: list[list[str]] = [[] for _ in enc.q_rows]
    contexts = [ids[m.bool()].tolist() for ids, m in zip(enc.ctx_ids, enc.ctx_mask)]
    cache = None
    for j in range(len(enc.q_rows[0])):
        ids, mask = _left_pad([c + row[j] for c, row in zip(contexts, enc.q_rows)], enc.pad_id, enc.ctx_ids.device)
        cache = KVCache(model, press=press, reserve=max_new_tokens + 8, packed=packed)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=enc.pad_id)
        for i, row in enumerate(out[:, ids.shape[1] :]):
            answers[i].append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers, cache


def compress_prefilled(cache: KVCache, press, model=None, enc: Encoded | None = None) -> KVCache:
    """Apply `press` to a copy of a cache prefilled with `record=True`, as if it had run during the prefill.

    Presses run right after each layer's prefill attention and never change that layer's output, so
    compressing afterwards with the recorded queries gives exactly the end-to-end result — one prefill
    then serves every (press, ratio). The original cache is left untouched.
    """
    from kvforge.presses.base import LayerContext

    if cache.recorded is None:
        raise KVForgeError("compress_prefilled needs a cache prefilled with record=True")
    fork = cache.fork()
    if press is None:
        return fork
    fork.press = press
    for layer_idx in fork.compressible_layers():
        module, query, attention_mask, scaling = cache.recorded[layer_idx]
        press.compress(LayerContext(module, fork, layer_idx, query, attention_mask, scaling))
    if press.has_extra_pass and (model is None or enc is None):
        raise KVForgeError(f"{press.name} runs extra passes after the prefill: pass model= and enc=")
    press.after_prefill(model, fork, enc)
    fork.press = press if press.acts_while_decoding else None
    return fork


def prefill_context(model, enc: Encoded, press=None, max_new_tokens: int = 64, record: bool = False,
                    packed: bool | None = None, chunk_size: int | None = None) -> KVCache:
    """Prefill the contexts of `enc` into a new KVCache, compressing it with `press` on the way (chunk by chunk
    with `chunk_size`, see `prefill`). `record` (one prefill serving many presses) needs an unchunked prefill."""
    if record and chunk_size is not None:
        raise KVForgeError("record=True replays the prefill's queries per layer, which needs an unchunked prefill; "
                           "drop chunk_size or record")
    cache = KVCache(model, press=press, reserve=enc.longest_question + max_new_tokens + 8, packed=packed,
                    chunk_size=chunk_size)
    cache.recorded = {} if record else None
    cache.score_memo = {} if record else None
    prefill(model, enc.ctx_ids, enc.ctx_mask, cache)
    cache.armed = False
    if press is not None:
        press.after_prefill(model, cache, enc)  # extra passes over the context (KVzip); a no-op for most presses
    return cache


def generate(
    model,
    tokenizer,
    context: str | Sequence[str],
    questions: str | Sequence[str] | Sequence[Sequence[str]],
    press=None,
    max_new_tokens: int = 64,
    answer_prefix: str = "",
    chat_template: bool | None = None,
    return_cache: bool = False,
    packed: bool | None = None,
    query_aware: bool = False,
    cuda_graph: bool = False,
    chunk_size: int | None = None,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
    compile: bool | str = "auto",
):
    """Answer `questions` about `context`, compressing the context's KV cache once with `press`.

    Every question is answered from the same compressed cache, restored between questions so answers
    never see each other. `context` may be a list (a batch, left-padded); then `questions` is either one
    list asked of every context or one list per context, and the result is one list of answers per
    context, equal to running each context alone. Greedy decoding.

    Returns a list of answers (one per question), or a list of such lists for a batch; with
    `return_cache=True`, `(answers, cache)` where the cache holds the compressed context. `packed` chooses
    the storage of per-head budgets (default: packed on CUDA, padded block on CPU).

    `query_aware=True` compresses context + question together instead, once per question (see
    `answer_query_aware`); `return_cache` then gives the last question's cache. Default: query-agnostic.
    `cuda_graph=True` replays one captured decode step per token (fast on CUDA; see `answer`), compiled as
    `compile` says (default "auto": inductor's max-autotune on CUDA, tuning cached on disk; False: none).
    `chunk_size`: prefill the context that many tokens at a time, compressing as it goes (see `prefill`), so the
    prefill's memory is the weights, the kept entries and one chunk's activations.
    `prompt_format`: "kvpress" (default; token for token kvpress's pipeline) or "kvforge" (see `kvforge.prompt`).
    """
    if press is not None:
        check_press(press)  # a name instead of a press object: refused before any work
    check_chunking(press, chunk_size)
    if query_aware and chunk_size is not None:
        raise KVForgeError("query_aware=True prefills context + question with model.generate, unchunked; drop "
                           "chunk_size or query_aware")
    check_count(max_new_tokens, "max_new_tokens")
    check_prompt_format(prompt_format)
    contexts = _contexts(context)
    batched = not isinstance(context, str)
    qs = _questions_per_context(questions, len(contexts))
    enc = encode(model, tokenizer, contexts, qs, answer_prefix, chat_template, max_new_tokens, prompt_format)
    if query_aware:
        answers, cache = answer_query_aware(model, tokenizer, enc, press, max_new_tokens, packed=packed)
    else:
        cache = prefill_context(model, enc, press, max_new_tokens, packed=packed, chunk_size=chunk_size)
        answers = answer(model, tokenizer, cache, enc, max_new_tokens, cuda_graph=cuda_graph, compile=compile)
    result = answers if batched else answers[0]
    return (result, cache) if return_cache else result


def _contexts(context) -> list[str]:
    """`context` as a list of texts: a string or a non-empty list of strings, none of them empty or only
    whitespace (there would be nothing to compress but the prompt template's own tokens)."""
    if isinstance(context, str):
        contexts = [context]
    elif isinstance(context, (list, tuple)) and all(isinstance(c, str) for c in context):
        contexts = list(context)
        if not contexts:
            raise KVForgeError("context is an empty list; give a string or a non-empty list of strings")
    else:
        raise KVForgeError(f"context must be a string or a list of strings; got {type(context).__name__}")
    for i, c in enumerate(contexts):
        if not c.strip():
            where = "context" if isinstance(context, str) else f"context[{i}]"
            raise KVForgeError(f"{where} is empty or only whitespace; give the text the questions are about")
    return contexts


def _questions_per_context(questions, n: int) -> list[list[str]]:
    seq = (list, tuple)
    if isinstance(questions, str):
        rows = [[questions]] * n
    elif isinstance(questions, seq) and questions and all(isinstance(q, str) for q in questions):
        rows = [list(questions)] * n
    elif (isinstance(questions, seq) and questions
          and all(isinstance(q, seq) and all(isinstance(x, str) for x in q) for q in questions)):
        rows = [list(q) for q in questions]
        if len(rows) != n:
            raise KVForgeError(f"got {len(rows)} question lists for {n} contexts; give one list per context")
    else:
        raise KVForgeError("questions must be a string, a list of strings, or one list of strings per context")
    counts = {len(r) for r in rows}
    if len(counts) != 1 or 0 in counts:
        raise KVForgeError(f"each context needs the same, non-zero number of questions; got {sorted(counts)}")
    return rows
