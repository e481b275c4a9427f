"""`kvforge viz attention`: where a prompt's tokens look, per layer, averaged over heads."""

from __future__ import annotations

from pathlib import Path

import torch

from kvforge.errors import KVForgeError, read_text


def attention_map(model_name: str, context_file: str, out: str = "attention.png", layers: str | None = None,
                  max_tokens: int = 1024) -> Path:
    """Draw the head-averaged attention matrix of the first `max_tokens` tokens of `context_file` for a few
    layers (log colour scale) into `out` (PNG). Uses eager attention to read the probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvforge.generate import model_max_length
    from kvforge.models import load_model

    text = read_text(context_file, "--context-file")
    if not text.strip():
        raise KVForgeError(f"--context-file {context_file!r} is empty or only whitespace; give a text to look at")
    try:
        picked = [int(x) for x in layers.split(",") if x.strip()] if layers else None
    except ValueError:
        raise KVForgeError(f"--layers {layers!r}: give comma-separated layer indices (e.g. 0,5,11)") from None
    if picked is not None and not picked:
        raise KVForgeError(f"--layers {layers!r} names no layer (e.g. 0,5,11)")
    model, tok = load_model(model_name)
    limit = model_max_length(model)
    ids = tok(text, return_tensors="pt")["input_ids"][:, : min(max_tokens, limit) if limit else max_tokens]
    n_layers = model.config.get_text_config().num_hidden_layers
    if picked is not None:
        bad = [i for i in picked if not 0 <= i < n_layers]
        if bad:
            raise KVForgeError(f"layer {bad[0]} does not exist; allowed: 0..{n_layers - 1}")
    else:
        picked = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("kvforge")
    fig, axes = plt.subplots(1, len(picked), figsize=(4 * len(picked), 4), squeeze=False)
    for ax, i in zip(axes[0], picked):
        a = att[i][0].float().mean(0).clamp(min=1e-6).log10()
        im = ax.imshow(a, cmap="magma", vmin=-4, vmax=0)
        ax.set_title(f"layer {i}")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="log10 attention (head mean)")
    out_path = Path(out)
    fig.savefig(out_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out_path
