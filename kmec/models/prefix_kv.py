"""Rows aligned at a split column, and the upper blocks' keys/values of what precedes it.

Contents:
    Aligned      rows shifted so that each row's split position lands on one column
    align_at()   build an :class:`Aligned` layout from right-padded rows
    PrefixKV     the keys and values of the blocks above a layer for the columns
                 before the split, computed once; a fresh cache of them per forward
    cache_kwarg() the name a model's forward takes its cache under

Why: the target-value optimisation adds δ to one layer's output at one position
per row (the subject's last token). In a causal model no position *before* it
depends on δ, at any layer, so the keys and values the upper blocks compute for
those positions are the same on every step. Shifting each row right (left
padding) so that its δ position lands on one column ``split`` lets one cache hold
them, and each step then runs only the columns from ``split`` on — on CounterFact
prompts under context prefixes, a third of each row.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kmec.models.hooks import replay_below


@dataclass(frozen=True)
class Aligned:
    """Rows shifted right by ``shift`` so that column ``split`` holds each row's split token.

    Attributes:
        ids, mask, pos: [rows, width] token ids (``pad`` where empty), attention mask and
            position ids (each token keeps its position in its own row; 0 where empty).
        shift: [rows] how far each row moved right.
        split: the common column.
        src: (row, column) of every real token in the right-padded input.
        dst: its column in the aligned layout.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    shift: torch.Tensor
    split: int
    src: tuple[torch.Tensor, torch.Tensor]
    dst: torch.Tensor

    def place(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [rows, T, ...] of the right-padded input in the aligned layout (zeros
        where empty)."""
        r, c = self.src
        out = values.new_zeros((self.ids.shape[0], self.ids.shape[1], *values.shape[2:]))
        out[r.to(values.device), self.dst.to(values.device)] = values[r.to(values.device),
                                                                     c.to(values.device)]
        return out

    def suffix_lengths(self) -> torch.Tensor:
        """[rows] real tokens from the split column on."""
        return self.mask[:, self.split:].sum(1)


def align_at(ids: torch.Tensor, mask: torch.Tensor, at: torch.Tensor, pad: int) -> Aligned:
    """Shift right-padded rows so that position ``at[r]`` of every row lands on one column.

    >>> a = align_at(torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
    ...              torch.tensor([0, 1]), pad=0)
    >>> a.ids.tolist(), a.pos.tolist(), a.split
    ([[0, 5, 6, 7], [8, 9, 0, 0]], [[0, 0, 1, 2], [0, 1, 0, 0]], 1)
    """
    device = ids.device
    lengths = mask.sum(1)
    split = int(at.max()) if at.numel() else 0
    shift = split - at
    width = split + int((lengths - at).max()) if at.numel() else 0
    real = mask.bool()
    rows, cols = real.nonzero(as_tuple=True)
    dst = cols + shift[rows]
    out_ids = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=device)
    out_mask = torch.zeros((ids.shape[0], width), dtype=mask.dtype, device=device)
    pos = torch.zeros((ids.shape[0], width), dtype=torch.long, device=device)
    out_ids[rows, dst] = ids[rows, cols]
    out_mask[rows, dst] = 1
    pos[rows, dst] = cols
    return Aligned(out_ids, out_mask, pos, shift, split, (rows, cols), dst)


def cache_kwarg(model: nn.Module) -> str:
    """``cache`` (transformers ≥ 5.x releases that renamed it) or ``past_key_values``.

    Read from the class's ``forward`` as well as the instance's: an instance whose
    ``forward`` is wrapped (a spy, a hook library taking ``*args, **kwargs``) still names
    the argument its class takes.
    """
    for fn in (model.forward, type(model).forward):
        params = inspect.signature(inspect.unwrap(fn)).parameters
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
    return "past_key_values"


class PrefixKV:
    """Keys and values of blocks ``layer+1..`` for the columns before ``split`` (no grad).

    Built by running the upper blocks once on those columns, with blocks
    ``0..layer`` replaced by their stored output (:func:`replay_below`).
    :meth:`cache` returns a fresh ``DynamicCache`` holding them, for one forward
    of the remaining columns (a forward appends to the cache it is given).
    """

    def __init__(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], layer: int,
                 split: int) -> None:
        self.kv, self.layer, self.split = list(kv), layer, split

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, layers_path: str, layer: int, template: Any,
                aligned: Aligned, lower: torch.Tensor) -> PrefixKV:
        """Run ``model``'s body on the columns before the split; ``lower`` is block
        ``layer``'s output there ([rows, split, d], in the model's dtype)."""
        from transformers import DynamicCache

        s = aligned.split
        if s == 0:
            return cls([], layer, 0)
        cache = DynamicCache()
        # the replayed blocks leave no entry: give them empty ones so the upper blocks'
        # entries keep their indices (and the mask is sized from block 0's length)
        empty = lower.new_zeros((lower.shape[0], 1, 0, 1))
        for i in range(layer + 1):
            cache.update(empty, empty, i)
        body = model.base_model
        with replay_below(model, layers_path, layer, template, lambda: lower):
            body(input_ids=aligned.ids[:, :s], attention_mask=aligned.mask[:, :s],
                 position_ids=aligned.pos[:, :s], use_cache=True, **{cache_kwarg(body): cache})
        kv = [(cache.layers[i].keys, cache.layers[i].values)
              for i in range(layer + 1, len(cache.layers))]
        return cls(kv, layer, s)

    @property
    def used(self) -> bool:
        """Whether there is anything before the split for an upper block to attend to."""
        return self.split > 0 and bool(self.kv)

    def select(self, rows: torch.Tensor) -> PrefixKV:
        """The same for a subset of rows."""
        return PrefixKV([(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.kv],
                        self.layer, self.split)

    def cache(self) -> Any:
        """A fresh cache: size-only placeholders for blocks ``0..layer``, then the keys
        and values (shared, not copied until a forward appends to them)."""
        from transformers import DynamicCache

        k0 = self.kv[0][0]
        dummy = k0.new_zeros((k0.shape[0], 1, self.split, 1))
        return DynamicCache([(dummy, dummy)] * (self.layer + 1) + self.kv)


def forward_suffix(body: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                   prefix: PrefixKV | None, kwarg: str) -> torch.Tensor:
    """``body``'s last hidden state for the columns after the split (``mask`` spans all
    columns, ``ids``/``pos`` only the suffix)."""
    extra: dict[str, Any] = {}
    if prefix is not None and prefix.used:
        extra = {kwarg: prefix.cache(), "use_cache": True}
    else:
        mask = mask[:, mask.shape[1] - ids.shape[1]:]
    return body(input_ids=ids, attention_mask=mask, position_ids=pos, **extra).last_hidden_state

