"""`generate()`: compress a context once, answer several questions from the same compressed cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvforge.cache.kvcache import KVCache
from kvforge.errors import KVForgeError

_SPLIT = "\x00KVFORGE-QUESTION\x00"


def format_prompt(tokenizer, context: str, question: str, chat_template: bool | None = None) -> tuple[str, str]:
    """Split the prompt into (context text, question text).

    With a chat template (default when the tokenizer has one) the context is the template's prefix plus
    the context; the question carries the rest of the user turn and the assistant prefix (kvpress's
    pipeline does the same), so only the context is compressed.
    """
    context = context.rstrip()
    if not _use_template(tokenizer, chat_template):
        return context, "\n\n" + question
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + _SPLIT + question}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(_SPLIT)
    return head, "\n\n" + tail


def _use_template(tokenizer, chat_template: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template


def encode_prompt(
    tokenizer, context: str, question: str, answer_prefix: str = "", chat_template: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of (context, question + answer prefix), tokenized separately: the exact ids kvforge feeds
    the model. Plain `model.generate` on their concatenation is the uncompressed reference."""
    ctx_text, q_text = format_prompt(tokenizer, context, question, chat_template)
    special = not _use_template(tokenizer, chat_template)
    ctx = tokenizer(ctx_text, add_special_tokens=special)["input_ids"]
    q = tokenizer(q_text + answer_prefix, add_special_tokens=False)["input_ids"]
    return ctx, q


def model_max_length(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
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


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the context through the model into `cache` (compressing it if the cache is armed).

    Position ids follow `generate()`'s rule (cumulative sum of the mask), so left padding is exact.
    Returns the last position's logits `[B, vocab]`.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


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
):
    """Answer `questions` about `context`, compressing the context's KV cache once with `press`.

    Every question is answered from the same compressed cache, restored between questions so answers
    never see each other. `context` may be a list (a batch, left-padded); then `questions` is either one
    list asked of every context or one list per context, and the result is one list of answers per
    context, equal to running each context alone. Greedy decoding.

    Returns a list of answers (one per question), or a list of such lists for a batch; with
    `return_cache=True`, `(answers, cache)` where the cache holds the compressed context.
    """
    batched = not isinstance(context, str)
    contexts = list(context) if batched else [context]
    if not contexts:
        raise KVForgeError("context is an empty list; give a string or a non-empty list of strings")
    qs = _questions_per_context(questions, len(contexts))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    enc = [[encode_prompt(tokenizer, c, q, answer_prefix, chat_template) for q in row] for c, row in zip(contexts, qs)]
    ctx_rows = [row[0][0] for row in enc]
    q_rows = [[q for _, q in row] for row in enc]
    longest_q = max(len(r) for row in q_rows for r in row)
    limit = model_max_length(model)
    longest = max(len(r) for r in ctx_rows)
    if limit and longest + longest_q + max_new_tokens > limit:
        raise KVForgeError(
            f"context of {longest} tokens + question of {longest_q} + max_new_tokens={max_new_tokens} exceeds "
            f"the model's maximum of {limit} tokens; shorten the context"
        )

    cache = KVCache(model, press=press, reserve=longest_q + max_new_tokens + 8)
    ctx_ids, ctx_mask = _left_pad(ctx_rows, pad_id, device)
    prefill(model, ctx_ids, ctx_mask, cache)
    cache.armed = False
    state = cache.snapshot()

    answers: list[list[str]] = [[] for _ in contexts]
    for j in range(len(qs[0])):
        q_ids, q_mask = _left_pad([row[j] for row in q_rows], pad_id, device)
        ids = torch.cat([ctx_ids, q_ids], dim=1)
        mask = torch.cat([ctx_mask, q_mask], dim=1)
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
                pad_token_id=pad_id,
            )
        for i, row in enumerate(out[:, ids.shape[1] :]):
            answers[i].append(tokenizer.decode(row, skip_special_tokens=True).strip())
        cache.restore(state)
    result = answers if batched else answers[0]
    return (result, cache) if return_cache else result


def _questions_per_context(questions, n: int) -> list[list[str]]:
    if isinstance(questions, str):
        rows = [[questions]] * n
    elif questions and all(isinstance(q, str) for q in questions):
        rows = [list(questions)] * n
    elif questions and all(not isinstance(q, str) for q in questions):
        rows = [list(q) for q in questions]
        if len(rows) != n:
            raise KVForgeError(f"got {len(rows)} question lists for {n} contexts; give one list per context")
    else:
        raise KVForgeError("questions must be a string, a list of strings, or one list of strings per context")
    counts = {len(r) for r in rows}
    if len(counts) != 1 or 0 in counts:
        raise KVForgeError(f"each context needs the same, non-zero number of questions; got {sorted(counts)}")
    return rows
