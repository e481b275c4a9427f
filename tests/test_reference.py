"""SnapKV and AdaKV through the engine versus an independent slow reference.

The reference never touches kvforge's cache, masks or presses: scores come from the eager attention
probabilities transformers returns, the kept sets are chosen with plain Python sorting, and decoding runs
over a full stock DynamicCache through a test-only attention function that hides the evicted entries.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from kvforge import generate, get_press
from kvforge.generate import encode_prompt
from kvforge.models import tiny_model

CONTEXT = (
    "The lighthouse keeper logged every ship: the Osprey on Monday, the Kestrel on Tuesday, the Heron on "
    "Friday. Fog came in on Wednesday and the horn sounded for nine hours. "
) * 2
QUESTION = "Which ship came on Tuesday?"
KEEP: dict[int, torch.Tensor] = {}  # layer -> bool [H_kv, n_ctx]; empty = attend everything


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    hq, q = query.shape[1], query.shape[2]
    h, n = key.shape[1], key.shape[2]
    g = hq // h
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    allowed = torch.arange(n)[None, :] <= torch.arange(n - q, n)[:, None]  # causal [q, n]
    allowed = allowed[None, None].repeat(1, hq, 1, 1)
    keep = KEEP.get(module.layer_idx)
    if keep is not None:
        allowed[:, :, :, : keep.shape[1]] &= keep.repeat_interleave(g, dim=0)[None, :, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (probs @ v).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvforge_test_reference", reference_attention)
AttentionMaskInterface.register("kvforge_test_reference", sdpa_mask)


def snapkv_scores(attn: torch.Tensor, h: int, window: int = 32, kernel: int = 7) -> list[list[float]]:
    """attn: eager probabilities [Hq, n, n] of one layer -> per KV head, a score per entry (window = inf)."""
    hq, n, _ = attn.shape
    s = attn[:, n - window :, : n - window].sum(1).view(h, hq // h, n - window).mean(1)
    s = F.avg_pool1d(s[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    return [s[i].tolist() + [float("inf")] * window for i in range(h)]


def snapkv_keep(scores: list[list[float]], k: int) -> torch.Tensor:
    keep = torch.zeros(len(scores), len(scores[0]), dtype=torch.bool)
    for i, row in enumerate(scores):
        for j in sorted(range(len(row)), key=lambda j: -row[j])[:k]:
            keep[i, j] = True
    return keep


def adakv_keep(scores: list[list[float]], k: int, alpha: float = 0.2) -> torch.Tensor:
    h, n = len(scores), len(scores[0])
    floor = int(alpha * k)
    forced = {(i, j) for i, row in enumerate(scores) for j in sorted(range(n), key=lambda j: -row[j])[:floor]}
    ranked = sorted(((float("inf") if (i, j) in forced else scores[i][j], i, j) for i in range(h) for j in range(n)),
                    key=lambda t: -t[0])
    keep = torch.zeros(h, n, dtype=torch.bool)
    for _, i, j in ranked[: k * h]:
        keep[i, j] = True
    return keep


def reference_answer(model, tok, choose, ratio: float, max_new_tokens: int) -> str:
    ctx, q = encode_prompt(tok, CONTEXT, QUESTION)
    n = len(ctx)
    model.set_attn_implementation("eager")
    KEEP.clear()
    try:
        with torch.no_grad():
            out = model(torch.tensor([ctx]), output_attentions=True, use_cache=True)
            cache = out.past_key_values
            h = model.config.num_key_value_heads
            for layer, attn in enumerate(out.attentions):
                KEEP[layer] = choose(snapkv_scores(attn[0], h), int(n * (1 - ratio)))
            model.set_attn_implementation("kvforge_test_reference")
            ids, tokens = torch.tensor([q]), []
            for _ in range(max_new_tokens):
                pos = torch.arange(cache.get_seq_length(), cache.get_seq_length() + ids.shape[1])[None]
                logits = model(ids, past_key_values=cache, position_ids=pos, use_cache=True).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt == tok.eos_token_id:
                    break
                tokens.append(nxt)
                ids = torch.tensor([[nxt]])
    finally:
        model.set_attn_implementation("kvforge")
        KEEP.clear()
    return tok.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("name,choose", [("snapkv", snapkv_keep), ("adakv", adakv_keep)])
def test_engine_matches_slow_reference(smol_tokenizer, family, name, choose):
    model = tiny_model(family, seed=1)
    for ratio in (0.3, 0.7):
        ours = generate(model, smol_tokenizer, CONTEXT, [QUESTION], press=get_press(name, compression_ratio=ratio),
                        max_new_tokens=16)[0]
        assert ours == reference_answer(model, smol_tokenizer, choose, ratio, 16)
        assert ours  # a non-empty answer: the comparison means something
