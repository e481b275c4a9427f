"""How a prompt is built from a context and a question: the exact token ids kvforge feeds the model."""

from __future__ import annotations

_SPLIT = "\x00KVFORGE-QUESTION\x00"


def format_prompt(tokenizer, context: str, question: str, chat_template: bool | None = None) -> tuple[str, str]:
    """Split the prompt into (context text, question text).

    With a chat template (default when the tokenizer has one) the context is the template's prefix plus
    the context; the question carries the rest of the user turn and the assistant prefix (kvpress's
    pipeline does the same), so only the context is compressed.
    """
    context = context.rstrip()
    if not use_template(tokenizer, chat_template):
        return context, "\n\n" + question
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + _SPLIT + question}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(_SPLIT)
    return head, "\n\n" + tail


def use_template(tokenizer, chat_template: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template


def encode_prompt(
    tokenizer, context: str, question: str, answer_prefix: str = "", chat_template: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of (context, question + answer prefix), tokenized separately: the exact ids kvforge feeds
    the model. Plain `model.generate` on their concatenation is the uncompressed reference."""
    ctx_text, q_text = format_prompt(tokenizer, context, question, chat_template)
    special = not use_template(tokenizer, chat_template)
    ctx = tokenizer(ctx_text, add_special_tokens=special)["input_ids"]
    q = tokenizer(q_text + answer_prefix, add_special_tokens=False)["input_ids"]
    return ctx, q
