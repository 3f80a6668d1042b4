"""Run only the blocks a MEND edit can change, from a cache of the residual stream below.

Contents:
    LowerCache       residual stream at the input of block ``first``, one tensor per text row
    collect_lower()  fill a LowerCache in forward passes stopped after block ``first − 1``
    skipping_lower() context manager: blocks ``0..first−1`` return the cached stream
                     instead of computing it

An edit of the last three MLPs changes nothing below them, so during training
the 27 lower blocks of SmolLM2 compute the same numbers for a record at every
step. Caching their output once per record (a few minutes for 1,000 records)
and skipping them afterwards makes a training step several times cheaper.

Skipping works by giving each lower block's *instance* a ``forward`` that
returns the cached tensor (the class's forward is untouched and the instance
attribute is deleted when the ``with`` block ends, even on error); embeddings,
masks and rotary tables are still computed by the model as usual. Blocks must
return their hidden state as a tensor or as the first item of a tuple (all
four supported families do); :func:`kmec.backends.mend.train.train_editor`
compares one batch with and without skipping and falls back to full passes if
they differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from kmec.backends.mend.edit import tokenize
from kmec.models.adapters import ArchAdapter
from kmec.models.hooks import Trace, device_of, get_module


class LowerCache(dict[Hashable, torch.Tensor]):
    """Row key -> residual stream [row length, d_model] at the input of block ``first``."""

    def __init__(self, first: int) -> None:
        super().__init__()
        self.first = first

    def batch(self, keys: Sequence[Hashable], width: int) -> torch.Tensor:
        """The cached rows as one right-padded [rows, width, d_model] tensor (zeros in padding)."""
        rows = [self[k] for k in keys]
        out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        for i, h in enumerate(rows):
            out[i, : h.shape[0]] = h
        return out


@torch.no_grad()
def collect_lower(model: Any, tok: Any, adapter: ArchAdapter, first: int,
                  rows: Sequence[tuple[Hashable, str, str | None]], *, max_len: int = 96,
                  chunk: int = 32, progress: Any = None) -> LowerCache:
    """Cache the input of block ``first`` for each ``(key, prompt, target)`` row.

    Rows are tokenised exactly as :func:`kmec.backends.mend.edit.tokenize` does
    for training, so a cached row lines up with the row a batch builds.
    """
    cache = LowerCache(first)
    if first == 0:
        return cache
    path = adapter.site("layer", first - 1)
    device = device_of(model)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        t = tokenize(tok, [(p, y) for _, p, y in part], max_len=max_len, device=device)
        with Trace(model, path, retain_output=True, stop=True) as tr:
            model(input_ids=t.input_ids, attention_mask=t.attention_mask)
        lengths = t.attention_mask.sum(1).tolist()
        for (key, _, _), h, n in zip(part, tr.output, lengths):
            cache[key] = h[:n].clone()
        if progress:
            progress("caching lower layers", min(start + chunk, len(rows)), len(rows))
    return cache


@contextlib.contextmanager
def skipping_lower(model: Any, adapter: ArchAdapter, first: int,
                   hidden: torch.Tensor | None) -> Iterator[None]:
    """Within the block, blocks ``0..first−1`` skip their work and return ``hidden``.

    ``hidden`` is the residual stream at the input of block ``first`` for
    exactly the batch the model is then called with. None: nothing is skipped.
    """
    if hidden is None or first == 0:
        yield
        return
    blocks = [get_module(model, adapter.site("layer", i)) for i in range(first)]

    def cached(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return hidden

    try:
        for block in blocks:
            block.forward = cached
        yield
    finally:
        for block in blocks:
            if "forward" in vars(block):
                del block.forward
