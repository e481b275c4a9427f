"""`prefill` and `generate` over reused documents: KVLink's request path.

The sequence is `[prefix][doc 1][links 1]…[doc N][links N][prompt]`:
- `prefix`: with `template=True`, the chat template up to where the user's message starts (system prompt, BOS),
  encoded alone at position 0 like a document (it is the sequence's start, so it sees only itself either way);
- each document: encoded alone from position 0 (or read from the store), placed at its global offset;
- `links` (optional): the trained link tokens of each document's slot, computed at request time, seeing everything
  before them; `recompute=k` (optional) recomputes each document's first k tokens the same way (CacheBlend-style);
- the prompt (a question): with `template=True`, the rest of the user turn and the assistant prefix.
With `template=False` documents and prompt are tokenized with `add_special_tokens=False` and concatenated as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvforge.cache import KVCache
from kvforge.cache.graphs import GraphForward
from kvforge.errors import KVForgeError
from kvforge.generate import Encoded, answer, model_max_length
from kvforge.link.assemble import SLIDING, Cached, Fresh, build_cache, check_plan
from kvforge.link.docs import DocKV, encode_document
from kvforge.link.tokens import Links
from kvforge.prompt import format_prompt

DOC_SEPARATOR = "\n\n"  # after each document's text, with template=True


@dataclass
class Request:
    """Token ids of one request: the prefix (may be empty), each document, and each prompt."""

    prefix: list[int]
    documents: list[list[int]]
    prompts: list[list[int]]


def tokenize(tokenizer, documents: Sequence[str], prompts: Sequence[str], template: bool = True,
             answer_prefix: str = "") -> Request:
    """Token ids of documents and prompts (see the module docstring for the layout)."""
    if isinstance(documents, str) or not documents:
        raise KVForgeError("documents must be a non-empty list of strings; got "
                           f"{'a string' if isinstance(documents, str) else 'an empty list'}")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if not template:
        return Request([], [ids(d) for d in documents], [ids(p + answer_prefix) for p in prompts])
    if not getattr(tokenizer, "chat_template", None):
        raise KVForgeError("template=True needs a tokenizer with a chat template; pass template=False")
    head, _ = format_prompt(tokenizer, "", "", chat_template=True, prompt_format="kvforge")
    tails = [format_prompt(tokenizer, "", p, chat_template=True, prompt_format="kvforge")[1]
             .lstrip("\n") for p in prompts]
    return Request(ids(head), [ids(d.strip() + DOC_SEPARATOR) for d in documents],
                   [ids(t + answer_prefix) for t in tails])


def _check(model, tokenizer, req: Request, links: Links | None, extra: int) -> None:
    if any(not d for d in req.documents):
        raise KVForgeError("a document is empty (no tokens); give non-empty documents")
    if links is not None:
        links.check(model, tokenizer, len(req.documents))  # tokenizer None (ids-level callers): ids not checked
    n_links = 0 if links is None else links.n_links * len(req.documents)
    total = len(req.prefix) + sum(map(len, req.documents)) + n_links + extra
    limit = model_max_length(model)
    if limit and total > limit:
        longest = max(map(len, req.documents))
        raise KVForgeError(f"documents of {sum(map(len, req.documents))} tokens (longest {longest}) + prompt and "
                           f"answer ({extra}) + links ({n_links}) exceed the model's {limit} positions; "
                           "give fewer or shorter documents")


def _encoded(model, ids: list[int], store) -> DocKV:
    return store.get(ids) if store is not None else encode_document(model, ids)


def document_cache(model, tokenizer, req: Request, *, store=None, links: Links | None = None, recompute: int = 0,
                   full: bool = False, reserve: int = 256):
    """The batch-1 cache of `[prefix][documents with their links]` and its token ids (everything before the prompt).
    `full=True`: the baseline instead — prefix and documents in one ordinary causal forward (no reuse, no links)."""
    if recompute < 0:
        raise KVForgeError(f"recompute={recompute}; allowed: 0 or more tokens per document")
    if full:
        seq = req.prefix + [t for d in req.documents for t in d]
        device = next(model.parameters()).device
        cache = KVCache(model, reserve=reserve)
        ids = torch.tensor([seq], device=device)
        with torch.inference_mode():
            model(input_ids=ids, position_ids=torch.arange(len(seq), device=device)[None], past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
        return cache, seq
    pieces: list = [Cached(_encoded(model, req.prefix, store))] if req.prefix else []
    for slot, ids in enumerate(req.documents):
        k = min(recompute, len(ids))
        if k:
            pieces.append(Fresh(ids[:k]))
        pieces.append(Cached(_encoded(model, ids, store), drop=k))
        if links is not None:
            pieces.append(Fresh(links.ids_for(slot)))
    return build_cache(model, pieces, reserve=reserve)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def has_sliding(model) -> bool:
    return SLIDING in check_plan(model)


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def prefill(model, tokenizer, documents: Sequence[str], prompt: str | Sequence[str], *, store=None,
            links: Links | None = None, template: bool = True, recompute: int = 0, full: bool = False,
            answer_prefix: str = "", reserve: int = 256):
    """Reuse each document's KV (encoded alone from position 0, or read from `store`), move it to its global
    position, append `links` per document when given, then run the prompt.

    `prompt`: one string, or a list (a batch of rows sharing the documents, left-padded).
    `store`: a `DocumentStore` (or `MemoryStore`) to read documents from and add missing ones to.
    `recompute=k`: recompute the first k tokens of each document seeing everything before (CacheBlend-style).
    `full=True`: the baseline, the same tokens without links in one ordinary causal forward (no reuse).
    Returns `(cache, logits)`: the cache of the whole sequence (batch = number of prompts) and the last prompt
    position's logits `[batch, vocab]`.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    req = tokenize(tokenizer, documents, prompts, template, answer_prefix)
    return prefill_ids(model, tokenizer, req, store=store, links=links, recompute=recompute, full=full,
                       reserve=reserve)


@torch.inference_mode()
def prefill_ids(model, tokenizer, req: Request, *, store=None, links: Links | None = None, recompute: int = 0,
                full: bool = False, reserve: int = 256, graph: GraphForward | None = None):
    """`prefill` from token ids (`tokenize`'s `Request`); `tokenizer` gives the padding id and checks `links`
    (None: padding id 0, link ids taken as they are).

    `graph`: a `GraphForward` whose width is the prompt's length: the prompt's forward replays one captured step
    (on a GPU: no per-layer launch overhead, the time to first token of a reused request) over a copy of the placed
    documents in its static buffers; the returned cache is `graph.cache` (valid until its next call). One prompt,
    documents on full-attention layers."""
    if not req.prompts or any(not p for p in req.prompts):
        raise KVForgeError("the prompt is empty; give a non-empty prompt (or a list of them)")
    if has_sliding(model) and len(set(map(len, req.prompts))) > 1:
        raise KVForgeError("prompts of different token lengths cannot share a batch on a model with sliding-window "
                           "layers (padding would sit inside the window); pass them one at a time, or use "
                           "link.generate, which batches prompts of equal length")
    _check(model, tokenizer, req, links, max(map(len, req.prompts)))
    device = next(model.parameters()).device
    padded = len(set(map(len, req.prompts))) > 1
    # copied while the device is idle; a padding mask only when some prompt is padded
    if padded:
        ids, mask = _left_pad(req.prompts, _pad_id(tokenizer), device)
    else:
        ids = torch.tensor(req.prompts, dtype=torch.long).to(device)
    if graph is not None and len(req.prompts) > 1:
        raise KVForgeError(f"a GraphForward serves one prompt at a time; got {len(req.prompts)}")
    cache, seq = document_cache(model, tokenizer, req, store=store, links=links, recompute=recompute, full=full,
                                reserve=max(map(len, req.prompts)) + reserve)
    b, s = ids.shape[0], len(seq)
    if graph is not None:
        logits = graph.run(cache, ids, s)
        return graph.cache, logits
    if b > 1:
        cache.batch_repeat_interleave(b)
    if padded:
        full_mask = torch.cat([torch.ones(b, s, dtype=mask.dtype, device=device), mask], dim=1)
        position_ids = s + (mask.cumsum(-1) - 1).clamp(min=0)
    else:
        # every prompt token sees every earlier token: the ordinary cached forward, with no mask (given an all-ones
        # mask, kvforge's mask function reads it back from the device to find that none is needed: a sync)
        full_mask, position_ids = None, torch.arange(s, s + ids.shape[1], device=device).expand(b, -1)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=position_ids, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1]


def generate(model, tokenizer, documents: Sequence[str], questions: str | Sequence[str], *, store=None,
             links: Links | None = None, template: bool = True, recompute: int = 0, full: bool = False,
             answer_prefix: str = "", max_new_tokens: int = 64, return_cache: bool = False):
    """Greedy answers to `questions` (one string or a list) about `documents`, all from one reused document cache:
    the documents (and links) are assembled once, then every question is answered in one batched generation.
    Options as in `prefill`.
    Returns a list of answers (a string for a single question); with `return_cache`, `(answers, cache)`."""
    single = isinstance(questions, str)
    qs = [questions] if single else list(questions)
    if not qs:
        raise KVForgeError("questions is an empty list; give at least one question")
    req = tokenize(tokenizer, documents, qs, template, answer_prefix)
    longest = max(map(len, req.prompts))
    _check(model, tokenizer, req, links, longest + max_new_tokens)
    cache, seq = document_cache(model, tokenizer, req, store=store, links=links, recompute=recompute, full=full,
                                reserve=longest + max_new_tokens + 8)
    device = next(model.parameters()).device
    groups: dict = {}  # one padded batch; by token length on sliding-window models (no padding inside a window)
    for i, q in enumerate(req.prompts):
        groups.setdefault(len(q) if has_sliding(model) else 0, []).append(i)
    answers: list[str] = [""] * len(qs)
    for rows in groups.values():
        batch = cache.fork()
        if len(rows) > 1:
            batch.batch_repeat_interleave(len(rows))
        ctx = torch.tensor([seq], device=device).expand(len(rows), len(seq))
        enc = Encoded(ctx, torch.ones_like(ctx), [[req.prompts[i]] for i in rows], _pad_id(tokenizer), tokenizer,
                      template)
        for i, row in zip(rows, answer(model, tokenizer, batch, enc, max_new_tokens)):
            answers[i] = row[0]
    result = answers[0] if single else answers
    return (result, cache) if return_cache else result
