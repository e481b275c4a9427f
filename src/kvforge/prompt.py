"""How a prompt is built from a context and a question: the exact token ids kvforge feeds the model.

Two formats, both splitting the prompt into a context part (compressed) and a question part (not compressed):

- `kvpress` (default): token for token what kvpress 0.5.5's `KVPressTextGenerationPipeline.preprocess` builds.
  With a chat template: the template (`enable_thinking=False`) rendered around the context, cut where the
  question would start; the question is followed by the template's tail and the answer prefix. Without one:
  BOS text + context, then question + "\\n" + answer prefix. Both parts tokenized without special tokens.
- `kvforge` (kvforge's earlier format): the context right-stripped inside the template; the question part starts with
  "\\n\\n" (with or without a template); without a template the tokenizer's special tokens start the context.
"""

from __future__ import annotations

from kvforge.errors import KVForgeError

PROMPT_FORMATS = ("kvpress", "kvforge")
DEFAULT_PROMPT_FORMAT = "kvpress"

_SPLIT = "\x00KVFORGE-QUESTION\x00"


def check_prompt_format(prompt_format: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise KVForgeError(f"unknown prompt format {prompt_format!r}; allowed: {', '.join(PROMPT_FORMATS)}")
    return prompt_format


def format_prompt(tokenizer, context: str, question: str, chat_template: bool | None = None,
                  prompt_format: str = DEFAULT_PROMPT_FORMAT) -> tuple[str, str]:
    """Split the prompt into (context text, question text) in `prompt_format` (see the module docstring); the
    answer prefix, if any, is appended to the question text by the caller."""
    if check_prompt_format(prompt_format) == "kvpress":
        return _kvpress_prompt(tokenizer, context, question, use_template(tokenizer, chat_template))
    context = context.rstrip()
    if not use_template(tokenizer, chat_template):
        return context, "\n\n" + question
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + _SPLIT + question}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(_SPLIT)
    return head, "\n\n" + tail


def _kvpress_prompt(tokenizer, context: str, question: str, template: bool) -> tuple[str, str]:
    if not template:
        return (getattr(tokenizer, "bos_token", None) or "") + context, question + "\n"
    separator = "#" * (len(context) + 10)  # kvpress's own separator: the split happens where it does there
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    head, tail = text.split(separator)
    return head, question + tail


def use_template(tokenizer, chat_template: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template


def encode_prompt(
    tokenizer, context: str, question: str, answer_prefix: str = "", chat_template: bool | None = None,
    prompt_format: str = DEFAULT_PROMPT_FORMAT,
) -> tuple[list[int], list[int]]:
    """Token ids of (context, question + answer prefix), tokenized separately: the exact ids kvforge feeds
    the model. Plain `model.generate` on their concatenation is the uncompressed reference."""
    ctx_text, q_text = format_prompt(tokenizer, context, question, chat_template, prompt_format)
    special = prompt_format == "kvforge" and not use_template(tokenizer, chat_template)
    ctx = tokenizer(ctx_text, add_special_tokens=special)["input_ids"]
    q = tokenizer(q_text + answer_prefix, add_special_tokens=False)["input_ids"]
    return ctx, q
