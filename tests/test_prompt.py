"""Prompt formats: `kvpress` gives the token ids kvpress 0.5.5's pipeline builds; `kvforge` stays selectable."""

from __future__ import annotations

import copy

import pytest

from kvforge.errors import KVForgeError
from kvforge.generate import encode
from kvforge.models import tiny_model
from kvforge.prompt import DEFAULT_PROMPT_FORMAT, encode_prompt

CONTEXT = "The archive was founded in 1921 by the printer Ada Kell.\nIt holds the parish registers.  \n"
QUESTION = "Who founded the archive?"
PREFIX = " The archive was founded by"


def kvpress_recipe(tok, context: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """kvpress 0.5.5 `KVPressTextGenerationPipeline.preprocess`, written out from its source."""
    if tok.chat_template is None:
        context = getattr(tok, "bos_token", "") + context
        suffix = "\n"
    else:
        sep = "#" * (len(context) + 10)
        rendered = tok.apply_chat_template([{"role": "user", "content": context + sep}], add_generation_prompt=True,
                                           tokenize=False, enable_thinking=False)
        context, suffix = rendered.split(sep)
    return (tok.encode(context, add_special_tokens=False),
            tok.encode(question + suffix + answer_prefix, add_special_tokens=False))


def test_default_is_kvpress():
    assert DEFAULT_PROMPT_FORMAT == "kvpress"


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_kvpress_format_equals_kvpress_recipe(smol_tokenizer, prefix):
    tok = smol_tokenizer
    assert tok.chat_template  # SmolLM2 ships one
    ctx, q = encode_prompt(tok, CONTEXT, QUESTION, prefix)
    assert (ctx, q) == kvpress_recipe(tok, CONTEXT, QUESTION, prefix)
    # and, read as text, the two parts are the whole templated turn with the question right after the context
    full = tok.apply_chat_template([{"role": "user", "content": CONTEXT + QUESTION}], add_generation_prompt=True,
                                   tokenize=False)
    assert tok.decode(ctx + q) == full + prefix


def test_kvpress_format_without_chat_template(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    ctx, q = encode_prompt(tok, CONTEXT, QUESTION, PREFIX)
    assert (ctx, q) == kvpress_recipe(tok, CONTEXT, QUESTION, PREFIX)
    assert tok.decode(q) == QUESTION + "\n" + PREFIX


def test_kvforge_format_is_still_selectable(smol_tokenizer):
    tok = smol_tokenizer
    ctx, q = encode_prompt(tok, CONTEXT, QUESTION, PREFIX, prompt_format="kvforge")
    assert tok.decode(q).startswith("\n\n" + QUESTION) and tok.decode(q).endswith(PREFIX)
    assert tok.decode(ctx).endswith(CONTEXT.rstrip())  # right-stripped context
    assert (ctx, q) != encode_prompt(tok, CONTEXT, QUESTION, PREFIX)


def test_encode_carries_the_format_and_refuses_unknown_ones(smol_tokenizer):
    model = tiny_model("llama")
    enc = encode(model, smol_tokenizer, [CONTEXT], [[QUESTION]], PREFIX)
    ctx, q = kvpress_recipe(smol_tokenizer, CONTEXT, QUESTION, PREFIX)
    assert enc.ctx_ids[0].tolist() == ctx and enc.q_rows == [[q]] and enc.prompt_format == "kvpress"
    with pytest.raises(KVForgeError, match="unknown prompt format 'chatml'; allowed: kvpress, kvforge"):
        encode(model, smol_tokenizer, [CONTEXT], [[QUESTION]], prompt_format="chatml")


@pytest.mark.parametrize("prompt_format", ["kvpress", "kvforge"])
def test_generate_without_press_equals_plain_generate_in_either_format(smol_tokenizer, prompt_format):
    import torch

    from kvforge import generate

    model, tok = tiny_model("llama"), smol_tokenizer
    ids = torch.tensor([sum(encode_prompt(tok, CONTEXT, QUESTION, PREFIX, prompt_format=prompt_format), [])])
    model.set_attn_implementation("sdpa")
    try:
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.pad_token_id)
    finally:
        model.set_attn_implementation("kvforge")
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    got = generate(model, tok, CONTEXT, QUESTION, answer_prefix=PREFIX, max_new_tokens=6, prompt_format=prompt_format)
    assert want and got == [want]
