"""Link tokens: a few trained tokens after each document that restore the cross-document attention lost by
encoding documents apart (KVLink). Distinct per (document slot, index): slot k's j-th link is `<|kvlink_k_j|>`
(the reference reserves ids `128011 + 5·k + j` of Llama 3; we add tokens, so any supported model works).

They live in the tokenizer (added special tokens) and the embeddings (new rows when the vocabulary has no room),
and their table is written into the model's config (`config.kvlink`), so `save_pretrained` + `kvforge.load_model`
bring them back with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvforge.errors import KVForgeError

CONFIG_KEY = "kvlink"


def link_token(slot: int, index: int) -> str:
    return f"<|kvlink_{slot}_{index}|>"


@dataclass(frozen=True)
class Links:
    """`n_links` tokens for each of `max_docs` document slots: `ids[slot * n_links + j]` is `tokens[...]`'s id."""

    n_links: int
    max_docs: int
    tokens: tuple[str, ...]
    ids: tuple[int, ...]

    def ids_for(self, slot: int) -> list[int]:
        return list(self.ids[slot * self.n_links : (slot + 1) * self.n_links])

    def as_config(self) -> dict:
        return {"n_links": self.n_links, "max_docs": self.max_docs, "tokens": list(self.tokens), "ids": list(self.ids)}

    def check(self, model, tokenizer, n_docs: int = 0) -> None:
        """Raise a one-line KVForgeError unless `tokenizer` maps the link tokens to the ids they were trained with,
        the model's embeddings have those rows, and `n_docs` documents have slots. `tokenizer=None` skips the first."""
        got = self.ids if tokenizer is None else tokenizer.convert_tokens_to_ids(list(self.tokens))
        if list(got) != list(self.ids):
            bad = next(i for i, (a, b) in enumerate(zip(got, self.ids)) if a != b)
            raise KVForgeError(f"link tokens were trained for another tokenizer: {self.tokens[bad]!r} is id {got[bad]} "
                               f"here, {self.ids[bad]} in training; load the tokenizer saved with the links")
        rows = model.get_input_embeddings().weight.shape[0]
        if max(self.ids) >= rows:
            raise KVForgeError(f"link token id {max(self.ids)} is beyond the model's {rows} embeddings; load the model "
                               "saved with the links")
        if n_docs > self.max_docs:
            raise KVForgeError(f"{n_docs} documents but links for {self.max_docs} slots; give at most {self.max_docs} "
                               "documents or train links with more slots (--max-docs)")


def add_links(model, tokenizer, n_links: int = 5, max_docs: int = 20) -> Links:
    """Add `max_docs × n_links` link tokens to `tokenizer` and the model (new embedding rows when needed; no special
    initialisation, as in the reference), record them in `model.config.kvlink`. Returns their `Links`."""
    if n_links < 1 or max_docs < 1:
        raise KVForgeError(f"n_links={n_links}, max_docs={max_docs}; allowed: both ≥ 1")
    tokens = [link_token(k, j) for k in range(max_docs) for j in range(n_links)]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if max(ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    links = Links(n_links, max_docs, tuple(tokens), tuple(ids))
    setattr(model.config, CONFIG_KEY, links.as_config())
    return links


def load_links(model, tokenizer) -> Links:
    """The links recorded in a model's config (saved by `kvforge train kvlink`), checked against `tokenizer`."""
    cfg = getattr(model.config, CONFIG_KEY, None)
    if not cfg:
        raise KVForgeError("this model has no link tokens (config.kvlink is missing); train them with "
                           "`kvforge train kvlink` and load the saved directory")
    links = Links(int(cfg["n_links"]), int(cfg["max_docs"]), tuple(cfg["tokens"]), tuple(int(i) for i in cfg["ids"]))
    links.check(model, tokenizer)
    return links
