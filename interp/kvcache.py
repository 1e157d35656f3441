"""KV cache helpers over TransformerLens's `TransformerLensKeyValueCache`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache


def expand_cache(cache: TransformerLensKeyValueCache, batch: int, length: int | None = None) -> TransformerLensKeyValueCache:
    """A `batch`-row cache holding the first `length` positions of a 1-row cache.

    The rows are views (no copy); the first append of a forward pass writes new tensors, so the
    source cache is never modified.
    """
    src_len = cache.entries[0].past_keys.shape[1]
    length = src_len if length is None else length
    if cache.entries[0].past_keys.shape[0] != 1 or not 0 <= length <= src_len:
        raise ValueError(f"expand_cache needs a 1-row cache of at least {length} positions")
    return TransformerLensKeyValueCache(
        entries=[type(e)(e.past_keys[:, :length].expand(batch, -1, -1, -1), e.past_values[:, :length].expand(batch, -1, -1, -1)) for e in cache.entries],
        previous_attention_mask=cache.previous_attention_mask[:, :length].expand(batch, -1),
    )


def left_padded_cache(caches: Sequence[TransformerLensKeyValueCache], lengths: Sequence[int], pads: Sequence[int], width: int | None = None, layers: int | None = None) -> TransformerLensKeyValueCache:
    """A len(caches)-row cache: row r holds the first `lengths[r]` positions of 1-row cache r,
    after `pads[r]` masked zero columns, and masked zero columns after them up to `width` columns
    (default: none; every row then has lengths[r] + pads[r] columns). `layers`: only the first
    that many blocks' entries."""
    widths = {n + p for n, p in zip(lengths, pads)}
    if (width is None and len(widths) != 1) or (width is not None and max(widths) > width):
        raise ValueError(f"rows of a padded cache must fit in one width, got row widths {sorted(widths)} for width {width}")
    width = max(widths) if width is None else width
    pad = torch.nn.functional.pad
    entries = []
    for layer, entry in enumerate(caches[0].entries[:layers]):
        keys = [pad(c.entries[layer].past_keys[:, :n], (0, 0, 0, 0, p, width - n - p)) for c, n, p in zip(caches, lengths, pads)]
        values = [pad(c.entries[layer].past_values[:, :n], (0, 0, 0, 0, p, width - n - p)) for c, n, p in zip(caches, lengths, pads)]
        entries.append(type(entry)(torch.cat(keys), torch.cat(values)))
    mask = torch.cat([pad(c.previous_attention_mask[:, :n], (p, width - n - p)) for c, n, p in zip(caches, lengths, pads)])
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)


def select_rows(cache: TransformerLensKeyValueCache, rows: Tensor) -> TransformerLensKeyValueCache:
    """The cache restricted to batch rows `rows` (a copy)."""
    return TransformerLensKeyValueCache(
        entries=[type(e)(e.past_keys[rows], e.past_values[rows]) for e in cache.entries],
        previous_attention_mask=cache.previous_attention_mask[rows],
    )
