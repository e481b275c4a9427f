"""Shared test helpers (imported by test modules; pytest puts this folder on sys.path)."""

import torch

# the tiny random models of every family kvforge supports (kvforge.models.tiny_config)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "olmo2", "olmo3", "granite", "granitemoe",
            "mixtral", "qwen3_moe", "starcoder2", "gpt_neox", "phi", "stablelm", "smollm3", "cohere", "cohere2", "glm",
            "glm4", "gemma2", "gpt_oss", "arcee", "apertus", "seed_oss", "hunyuan_v1_dense", "ministral", "ernie4_5",
            "helium", "exaone4"]


def stock_attention(model) -> str:
    """transformers' own attention to compare against: SDPA, or eager for a family without SDPA (Gemma 2: its
    soft-capped logits; gpt-oss: its sink logits)."""
    return "sdpa" if getattr(model, "_supports_sdpa", True) else "eager"
CONTEXT = (
    "Mira keeps bees on the hill behind the mill. Every spring she counts the hives, paints the doors blue "
    "and writes the numbers in a red notebook. The miller's son helps her carry the frames. "
) * 2
CONTEXTS = [CONTEXT, CONTEXT[:140], "A short note about the mill and the river."]  # ragged: a padded batch
QUESTIONS = ["What colour are the hive doors?", "Who helps Mira?"]


def greedy_decode(model, cache, logits, pos: int, steps: int, graph: bool = False, compile: bool = False
                  ) -> list[int]:
    """Greedy tokens after a prefill: `steps` single-token forwards through `cache`, eagerly or replaying a
    `GraphDecoder` (graph mode, optionally `torch.compile`d; checks that the host bookkeeping followed the
    device afterwards)."""
    from kvforge.cache.graphs import GraphDecoder

    tok, out, start = logits.argmax(-1, keepdim=True), [], pos
    dec = GraphDecoder(model, cache, pos, steps=steps, batch=tok.shape[0], compile=compile) if graph else None
    with torch.inference_mode():
        for _ in range(steps):
            if dec is None:
                logits = model(input_ids=tok, position_ids=torch.full_like(tok, pos), past_key_values=cache,
                               logits_to_keep=1).logits[:, -1]
            else:
                logits = dec.step(tok)
            tok = logits.argmax(-1, keepdim=True)
            out.append(int(tok[0]))
            pos += 1
    if dec is not None:
        dec.close()
        assert cache.get_seq_length() == start + steps
    return out


def captured_codes_match_eager(name: str, steps: int = 40) -> bool:
    """A tiny fp32 Llama on CUDA, its cache coded by press `name` (kivi, gear, kvquant: groups of 16 coded while
    decoding; think: channel-pruned): True when the captured graph steps give the tokens of eager decoding. Plain
    Python (no pytest), so a bare GPU machine can run it: `python3 -c "import sys; sys.path.insert(0, 'tests');
    from helpers import captured_codes_match_eager as c; print(all(map(c, ['kivi', 'gear', 'kvquant', 'think'])))"`.
    """
    from kvforge import get_press
    from kvforge.cache import KVCache
    from kvforge.generate import prefill
    from kvforge.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama").to("cuda")
    ids = torch.randint(3, model.config.vocab_size, (1, 96), device="cuda")
    kwargs = {"compression_ratio": 0.5} if name == "think" else {"bits": 4, "group_size": 16}
    if name in ("kivi", "gear"):
        kwargs["residual_length"] = 16
    tokens = {}
    for graph in (False, True):
        cache = KVCache(model, press=get_press(name, **kwargs), reserve=steps + 16)
        logits = prefill(model, ids, torch.ones_like(ids), cache)
        tokens[graph] = greedy_decode(model, cache, logits, ids.shape[1], steps, graph=graph)
    return tokens[True] == tokens[False]


def captured_family_matches_eager(family: str, steps: int = 16) -> bool | None:
    """The tiny fp32 model of `family` on CUDA, a knorm 0.5 prefill of a batch of 2 random rows: True when the
    captured graph step gives the tokens of eager decoding, None when graph mode refuses the family (Gemma 2,
    gpt-oss: their attention runs eagerly). Plain Python, for a bare GPU machine: `python3 -c "import sys;
    sys.path.insert(0, 'tests'); from helpers import FAMILIES, captured_family_matches_eager as c;
    print({f: c(f) for f in FAMILIES})"`."""
    from kvforge import get_press
    from kvforge.cache import KVCache
    from kvforge.cache.graphs import GraphDecoder
    from kvforge.generate import prefill
    from kvforge.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model(family).to("cuda")
    ids = torch.randint(3, 40000, (2, 120), device="cuda")
    tokens = {}
    for graph in (False, True):
        cache = KVCache(model, press=get_press("knorm", compression_ratio=0.5), reserve=steps + 16)
        logits = prefill(model, ids, torch.ones_like(ids), cache)
        cache.armed = False
        if graph and GraphDecoder.unsupported(cache):
            return None
        tokens[graph] = greedy_decode(model, cache, logits, ids.shape[1], steps, graph=graph)
    return tokens[True] == tokens[False]

