"""Offline head-importance scores for the `headkv` press (`kvforge headkv-scores`).

HeadKV (Fu et al. 2024, https://arxiv.org/abs/2410.19258) ranks heads by how well they retrieve (and reason
over) a needle. Our calibration is a simpler retrieval-head score on a generated task
(`kvforge.eval.tasks.make_samples`, default RULER `niah_single_1`): for each sample, one forward of
context + question + answer prefix with eager attention; for every layer and query head, the attention
mass that the answer-prefix positions put on the tokens of the gold answer inside the context (the
needle's value), averaged over those positions; query heads are averaged per KV head, and samples are
averaged. The paper instead counts, while decoding the answer, how often a head's top attention lands on
the needle token being copied (and adds a reasoning term); attention mass is a smooth version of that
which needs no generation and works with any model that can return attention probabilities.

Output: `{"scores": [[...] per KV head] per layer, "model": ..., "task": ..., ...}` as JSON, the format
`HeadKVPress(scores_path=...)` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvforge.config import text_config
from kvforge.errors import KVForgeError
from kvforge.generate import encode_prompt, format_prompt


def _answer_token_positions(tokenizer, context: str, question: str, answers: list[str],
                            ctx_ids: list[int]) -> list[int]:
    """Positions in `ctx_ids` of the tokens covering any occurrence of an answer string in the context."""
    ctx_text, _ = format_prompt(tokenizer, context, question, prompt_format="kvforge")
    special = not bool(getattr(tokenizer, "chat_template", None))
    spans = []
    for ans in answers:
        start = ctx_text.find(ans)
        while ans and start >= 0:
            spans.append((start, start + len(ans)))
            start = ctx_text.find(ans, start + 1)
    if not spans:
        return []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(ctx_text, add_special_tokens=special, return_offsets_mapping=True)
        if enc["input_ids"] == ctx_ids:
            return [i for i, (a, b) in enumerate(enc["offset_mapping"])
                    if b > a and any(a < e and b > s for s, e in spans)]
    positions = set()  # slow tokenizer: find the answer's own token ids in the context
    for ans in answers:
        for text in (ans, " " + ans):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            m = len(piece)
            for i in range(len(ctx_ids) - m + 1):
                if m and ctx_ids[i : i + m] == piece:
                    positions.update(range(i, i + m))
    return sorted(positions)


@torch.inference_mode()
def head_scores(model, tokenizer, task: str = "niah_single_1", length: int = 1000, samples: int = 4,
                seed: int = 0) -> torch.Tensor:
    """Retrieval-head scores `[num_layers, num_kv_heads]` (float32) of `model` on `samples` samples of `task`."""
    from kvforge.eval.tasks import make_samples

    if samples < 1 or length < 1:
        raise KVForgeError(f"headkv-scores: samples={samples}, length={length}; both must be >= 1")
    limit = int(getattr(text_config(model), "max_position_embeddings", 0) or 0)
    if limit and length >= limit:
        raise KVForgeError(f"headkv-scores: length {length} does not fit the model's {limit} positions (with a "
                           "question); use a shorter --length")
    cfg = text_config(model)
    hq = cfg.num_attention_heads
    h = getattr(cfg, "num_key_value_heads", None) or hq  # GPT-NeoX's config has no such field (no GQA)
    device = next(model.parameters()).device
    total, used = None, 0
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for sample in make_samples(task, tokenizer, length, samples, seed):
            question, answers = sample.questions[0], sample.answers[0]
            ctx_ids, q_ids = encode_prompt(tokenizer, sample.context, question, sample.answer_prefix,
                                           prompt_format="kvforge")
            _, q_plain = encode_prompt(tokenizer, sample.context, question, "", prompt_format="kvforge")
            needle = _answer_token_positions(tokenizer, sample.context, question, answers, ctx_ids)
            if not needle:
                continue
            n_prefix = max(1, len(q_ids) - len(q_plain))  # the answer prefix (or the last token)
            rows = torch.arange(len(ctx_ids) + len(q_ids) - n_prefix, len(ctx_ids) + len(q_ids), device=device)
            cols = torch.tensor(needle, device=device)
            ids = torch.tensor([ctx_ids + q_ids], device=device)
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
            per_layer = []
            for attn in out.attentions:  # [1, Hq, T, T]
                mass = attn[0].float()[:, rows][:, :, cols].sum(-1).mean(-1)  # [Hq]
                per_layer.append(mass.reshape(h, hq // h).mean(-1))
            scores = torch.stack(per_layer).cpu()
            total = scores if total is None else total + scores
            used += 1
    finally:
        model.set_attn_implementation(previous)
    if total is None:
        raise KVForgeError(f"headkv-scores: no sample of task {task!r} has its answer inside the context; "
                           "use a retrieval task such as niah_single_1")
    return total / used


def write_head_scores(model, tokenizer, out: str, model_name: str, task: str = "niah_single_1",
                      length: int = 1000, samples: int = 4, seed: int = 0) -> dict:
    """Compute `head_scores` and save them as JSON at `out`; returns what was written."""
    scores = head_scores(model, tokenizer, task, length, samples, seed)
    result = {
        "scores": scores.tolist(),
        "model": model_name,
        "task": task,
        "length": length,
        "samples": samples,
        "seed": seed,
        "method": "attention mass from the answer-prefix positions onto the gold answer tokens, per KV head",
    }
    path = Path(out)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result
