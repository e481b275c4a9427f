"""Quest: query-aware page selection at decode time; nothing is evicted.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024,
https://arxiv.org/abs/2406.10774. Defaults from the paper: pages of 16 tokens, a token budget of 2048, the
first two layers left dense. Every decoding step, each KV head scores each page by an upper bound of q·k
computed from per-channel key minima and maxima, and attends only the best pages.

Honest accounting: this saves attention *reads* on a GPU with a kernel that skips unselected pages. On CPU,
and with the masked SDPA used here, the full K/V is still read and the bound computation is extra work, so
it saves no time; `stats()` reports the entries and bytes a paged kernel would read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.presses.base import LayerContext, Press, check_int, descending_rank
from kvforge.presses.decoding import get_state, host_read, set_state
from kvforge.presses.registry import register


def page_min_max(keys: torch.Tensor, page: torch.Tensor, first: int, count: int):
    """Per-channel min and max of the keys of pages `first .. first+count-1`, float32 `[B, H, count, D]`.

    `keys [B, H, m, D]`, `page [B, H, m]` the page of each entry (any value outside the range is ignored).
    Pages with no entry hold +inf / -inf.
    """
    b, h, m, d = keys.shape
    rel = page - first
    rel = torch.where((rel >= 0) & (rel < count), rel, count)  # out of range -> a spill page, dropped
    index = rel[..., None].expand(b, h, m, d)
    k = keys.float()
    lo = k.new_full((b, h, count + 1, d), float("inf")).scatter_reduce(2, index, k, "amin", include_self=True)
    hi = k.new_full((b, h, count + 1, d), float("-inf")).scatter_reduce(2, index, k, "amax", include_self=True)
    return lo[:, :, :count], hi[:, :, :count]


def upper_bound(query: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Σ_i max(q_i·min_i, q_i·max_i) for every query head and page: `query [B, H, G, D]`, `lo/hi [B, H, P, D]`
    -> `[B, H, G, P]` (= q⁺·max + q⁻·min, since max ≥ min)."""
    q = query.float()
    return (torch.einsum("bhgd,bhpd->bhgp", q.clamp(min=0), hi)
            + torch.einsum("bhgd,bhpd->bhgp", q.clamp(max=0), lo))


@register("quest")
@dataclass
class QuestPress(Press):
    """Nothing evicted. Pages = `page_size` consecutive real tokens of each row, in stored order (a row's pages do
    not depend on its padding, so a batch row selects what it would alone). Per page, per KV head, per channel:
    min and max of the keys (`[B, H_kv, P, D]`), computed at prefill compression time for the complete pages
    and extended as decoding completes pages; the last, partial pages are recomputed from their few entries.

    Each decoding step (`select`, before attention), for the query `[B, Hq, 1, D]`: bound per query head and
    page, max over the query heads of each KV head, then the top `token_budget // page_size` pages per KV head
    (the newest page always among them) are attended: `select` returns the mask `[B, H_kv, n]`, or None when
    every page fits (exactly the dense computation). Prompt and question forwards stay dense.

    Budget: `token_budget` tokens (paper default 2048); `budget`, when given, is the token budget;
    `compression_ratio` r > 0 instead attends `(1 − r)` of each row's entries (rounded down to pages).
    `skip_layers`: the first layers stay dense (the paper: 2).
    """

    kind = "selection"
    query_aware = True
    frees_memory = "no (reads fewer entries)"
    paper = "https://arxiv.org/abs/2406.10774"
    token_budget: int = 2048
    page_size: int = 16
    skip_layers: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "page_size", self.page_size, minimum=1)
        check_int(self, "token_budget", self.token_budget, minimum=1)
        check_int(self, "skip_layers", self.skip_layers, minimum=0)
        self.reset_stats()

    # -- accounting ------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters read by `stats()`."""
        self._steps = 0
        self._counts = None  # tensor: entries attended, entries stored, K/V bytes read, dense, metadata bytes

    def _count(self, ctx: LayerContext, attended: torch.Tensor, stored: torch.Tensor, pages: torch.Tensor) -> None:
        """Accumulate on the device (no sync per step)."""
        keys, values = ctx.keys, ctx.values
        per_entry = (keys.shape[-1] + values.shape[-1]) * keys.element_size()
        meta = 2 * keys.shape[-1] * 4  # float32 min and max per page
        a, s, p = attended.double(), stored.double(), pages.double()
        row = torch.stack([a, s, a * per_entry, s * per_entry, p * meta])
        self._counts = row if self._counts is None else self._counts + row
        self._steps += 1

    def stats(self) -> dict:
        """Totals over every decoding step and layer since `reset_stats()` (`layer_steps` = steps × layers):
        `entries_attended` and `entries_stored` (summed over rows and KV heads), `fraction_attended`,
        `kv_bytes_read` (the K/V a paged kernel reads: attended entries × (Dk + Dv) × element size),
        `kv_bytes_dense` (what dense attention reads) and `metadata_bytes_read` (page minima and maxima, float32)."""
        keys = ("entries_attended", "entries_stored", "kv_bytes_read", "kv_bytes_dense", "metadata_bytes_read")
        values = [0] * len(keys) if self._counts is None else [int(x) for x in self._counts.tolist()]
        out = {"layer_steps": self._steps, **dict(zip(keys, values))}
        out["fraction_attended"] = out["entries_attended"] / out["entries_stored"] if out["entries_stored"] else 1.0
        return out

    # -- pages ------------------------------------------------------------------------------------------------
    def _frozen(self, ctx: LayerContext, complete: int, page: torch.Tensor | None = None, start: int | None = None):
        """Min/max of the first `complete` pages (complete in every row and head), extending the layer's saved
        ones with the pages completed since; returns `(lo, hi)` `[B, H, complete, D]`. `page` (the page of each
        entry, -1 for padding) and `start` (`_first_at_or_after(page, pages saved)`) when the caller has them."""
        state = get_state(ctx)
        ps = self.page_size
        if state is None or "lo" not in state or state["pages"] > complete:
            done, lo, hi = 0, None, None
        else:
            done, lo, hi = state["pages"], state["lo"], state["hi"]
        if complete > done:
            if page is None or start is None or done != self._saved_pages(ctx):
                page = torch.where(ctx.real, ctx.token_index // ps, -1)
                start = _first_at_or_after(page, done)
            new_lo, new_hi = page_min_max(ctx.keys[:, :, start:], page[:, :, start:], done, complete - done)
            lo = new_lo if lo is None else torch.cat([lo, new_lo], dim=2)
            hi = new_hi if hi is None else torch.cat([hi, new_hi], dim=2)
            set_state(ctx, {"pages": complete, "lo": lo, "hi": hi})
        if lo is None:
            b, h, _, d = ctx.keys.shape
            lo = hi = ctx.keys.new_zeros(b, h, 0, d, dtype=torch.float32)
        return lo, hi

    @staticmethod
    def _saved_pages(ctx: LayerContext) -> int:
        """Pages whose bounds the layer holds (0 when none)."""
        state = get_state(ctx)
        return state["pages"] if state is not None and "lo" in state else 0

    def compress(self, ctx: LayerContext) -> None:
        """At the prefill: nothing removed; page minima and maxima of the complete pages are computed."""
        n_real = ctx.real.sum(-1)  # [B, H]
        self._frozen(ctx, int((n_real // self.page_size).min()))

    def _pages_kept(self, n_real: torch.Tensor) -> torch.Tensor:
        """Pages attended per row and head `[B, H]`."""
        ps = self.page_size
        if self.budget is not None or not self.compression_ratio:
            tokens = torch.full_like(n_real, self.budget if self.budget is not None else self.token_budget)
        else:
            tokens = (n_real.double() * (1.0 - self.compression_ratio)).long()
        return (tokens // ps).clamp(min=1)

    def _pages_kept_host(self, n: int) -> int:
        """`_pages_kept` of a row and head holding n entries, on the host (the same arithmetic)."""
        ps = self.page_size
        if self.budget is not None or not self.compression_ratio:
            tokens = self.budget if self.budget is not None else self.token_budget
        else:
            tokens = int(n * (1.0 - self.compression_ratio))
        return max(tokens // ps, 1)

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        """Before attention on a decoding step: bool `[B, H_kv, n]` of the entries to attend, or None for all.
        At most one host read (the page counts, and where the pages to compute start), none when every entry is real
        (`LayerContext.all_real`); `select_reference` is its twin."""
        real = ctx.real
        b, h, n = ctx.keys.shape[:3]
        n_real = torch.full((b, h), n, device=real.device) if ctx.all_real else real.sum(-1)  # [B, H]
        if ctx.rank < self.skip_layers:
            self._count(ctx, n_real.sum(), n_real.sum(), n_real.new_zeros(()))
            return None
        ps = self.page_size
        n_pages = (n_real + ps - 1) // ps
        kept = self._pages_kept(n_real)
        page = ctx.token_index // ps if ctx.all_real else torch.where(real, ctx.token_index // ps, -1)  # [B, H, n]
        done = self._saved_pages(ctx)
        if ctx.all_real:  # every (row, head) holds n entries, entry t is token t: all known on the host, no read
            complete, total = n // ps, (n + ps - 1) // ps
            fit = total <= self._pages_kept_host(n)
            starts = [min(done * ps, n), min(complete * ps, n)]  # page p starts at p · page_size
        else:  # the counts, where the saved pages end and where the complete ones end: one read
            complete_t = (n_real // ps).min()
            reads = [complete_t, (n_pages <= kept).all().long(), n_pages.max(),
                     _first_at_or_after_device(page, done), _first_at_or_after_device(page, complete_t)]
            complete, fit, total, *starts = host_read(torch.stack(reads))
        lo, hi = self._frozen(ctx, complete, page, starts[0])  # keeps the layer's page bounds current when all fit
        if fit:
            self._count(ctx, n_real.sum(), n_real.sum(), n_real.new_zeros(()))
            return None
        start = starts[1]
        open_lo, open_hi = page_min_max(ctx.keys[:, :, start:], page[:, :, start:], complete, total - complete)
        chosen, exists = _chosen_pages(ctx, (lo, hi), (open_lo, open_hi), total, n_pages, kept)
        mask = chosen.gather(2, page.clamp(min=0))
        mask = mask if ctx.all_real else mask & real
        self._count(ctx, mask.sum(), n_real.sum(), exists.sum())
        return mask

    def select_reference(self, ctx: LayerContext) -> torch.Tensor | None:
        """`select`'s slow twin: the same mask, read step by step (a host read per count)."""
        real = ctx.real
        n_real = real.sum(-1)  # [B, H]
        if ctx.rank < self.skip_layers:
            self._count(ctx, n_real.sum(), n_real.sum(), n_real.new_zeros(()))
            return None
        ps = self.page_size
        n_pages = (n_real + ps - 1) // ps
        kept = self._pages_kept(n_real)
        complete = int((n_real // ps).min())
        lo, hi = self._frozen(ctx, complete)  # keeps the layer's page bounds current even when all fit
        if bool((n_pages <= kept).all()):
            self._count(ctx, n_real.sum(), n_real.sum(), n_real.new_zeros(()))
            return None
        page = torch.where(real, ctx.token_index // ps, -1)  # [B, H, n]
        total = int(n_pages.max())
        start = _first_at_or_after(page, complete)
        open_lo, open_hi = page_min_max(ctx.keys[:, :, start:], page[:, :, start:], complete, total - complete)
        chosen, exists = _chosen_pages(ctx, (lo, hi), (open_lo, open_hi), total, n_pages, kept)
        mask = chosen.gather(2, page.clamp(min=0)) & real
        self._count(ctx, mask.sum(), n_real.sum(), exists.sum())
        return mask


def _chosen_pages(ctx: LayerContext, frozen: tuple, open_: tuple, total, n_pages: torch.Tensor, kept: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages chosen `[B, H, P]` (the `kept` of highest upper bound for the newest query, the newest page always) and
    which pages exist, from the frozen pages' and the open pages' key bounds."""
    b, hq, _, d = ctx.query.shape
    h = ctx.keys.shape[1]
    query = ctx.query[:, :, -1].reshape(b, h, hq // h, d)
    bound = torch.cat([upper_bound(query, *frozen), upper_bound(query, *open_)], dim=-1)
    bound = bound.amax(2)  # [B, H, P]: the best query head of the group
    idx = torch.arange(total, device=bound.device)
    exists = idx < n_pages[..., None]
    bound = bound.masked_fill(~exists, float("-inf"))
    bound = bound.masked_fill(idx == n_pages[..., None] - 1, float("inf"))  # the newest page, always
    return (descending_rank(bound) < kept[..., None]) & exists, exists


def _first_at_or_after_device(page: torch.Tensor, first) -> torch.Tensor:
    """`_first_at_or_after` as a 0-d tensor (`first` an int or a 0-d tensor), read back with the other counts."""
    hit = page >= first
    return torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(page[..., 0], page.shape[-1])).min()


def _first_at_or_after(page: torch.Tensor, first: int) -> int:
    """The first stored position holding an entry of page >= `first`, over every row and head (entries are in
    token order, so everything from there on is page >= `first` or padding)."""
    hit = page >= first
    pos = torch.where(hit.any(-1), hit.int().argmax(-1), torch.full_like(page[..., 0], page.shape[-1]))
    return int(pos.min()) if pos.numel() else 0
