"""Length-bucketed, padded batches of windows, sharded over ranks.

Contents:
    Batch      padded ids [B, L], attention mask, and the mask of counted tokens
    Pool       the batches made from one pool of windows + the stream position after it
    pools()    windows -> pools of length-bucketed batches for one rank

Bucketing. Windows are read ``pool_size`` at a time, sorted by length
(longest first, ties by index) and packed greedily so that each batch holds
at most ``batch_tokens`` padded positions: a batch's width is its first
(longest) window's length, so similar lengths share a batch and padding stays
small. Padding is on the right; padded positions are masked out of the
attention and out of the statistics.

Sharding. Rank ``r`` of ``w`` takes the windows whose global index ``i``
satisfies ``i % w == r``; every rank reads the same global stream, so the
union over ranks is exactly the single-process stream.

Resuming. ``Pool.position`` is the global index of the first window not yet
consumed; a run restarted with ``start=position`` skips exactly the windows
already added (on this rank).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kmec.stats.corpus import Window


@dataclass(frozen=True)
class Batch:
    """A padded batch.

    Attributes:
        input_ids: [B, L] int64, right-padded.
        attention_mask: [B, L] int64, 1 on real ids.
        counted: [B, L] bool, True on ids whose keys enter the statistics
            (real ids minus special prefixes).
        tokens: number of counted ids.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    counted: torch.Tensor
    tokens: int


@dataclass(frozen=True)
class Pool:
    """Batches built from one pool of windows; ``position`` = next unread global index."""

    batches: tuple[Batch, ...]
    position: int


def _pad(group: list[Window], pad_id: int) -> Batch:
    width = len(group[0].ids)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(group), width), dtype=torch.long)
    counted = torch.zeros((len(group), width), dtype=torch.bool)
    for row, w in enumerate(group):
        n = len(w.ids)
        ids[row, :n] = torch.tensor(w.ids, dtype=torch.long)
        attn[row, :n] = 1
        counted[row, w.n_special:n] = True
    return Batch(ids, attn, counted, sum(w.n_counted for w in group))


def bucket(windows: list[Window], *, batch_tokens: int, pad_id: int) -> list[Batch]:
    """Sort ``windows`` by length and pack them into batches of ≤ ``batch_tokens`` positions.

    A window longer than ``batch_tokens`` gets a batch of its own.

    >>> ws = [Window(i, tuple(range(n)), 0) for i, n in enumerate([3, 8, 2, 7])]
    >>> [tuple(b.input_ids.shape) for b in bucket(ws, batch_tokens=16, pad_id=0)]
    [(2, 8), (2, 3)]
    """
    ordered = sorted(windows, key=lambda w: (-len(w.ids), w.index))
    out: list[Batch] = []
    i = 0
    while i < len(ordered):
        rows = max(1, batch_tokens // len(ordered[i].ids))
        out.append(_pad(ordered[i: i + rows], pad_id))
        i += rows
    return out


def pools(
    stream: Iterable[Window],
    *,
    batch_tokens: int,
    pool_size: int,
    pad_id: int,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
) -> Iterator[Pool]:
    """Cut this rank's share of ``stream`` into pools of bucketed batches.

    Args:
        stream: the global window stream (see :func:`kmec.stats.corpus.windows`).
        batch_tokens: most padded positions per batch.
        pool_size: windows sorted together (per rank).
        pad_id: id used for padding (masked out anyway).
        rank, world: this process's shard.
        start: global index to resume from (earlier windows are skipped).
    """
    group: list[Window] = []
    last = start - 1
    for w in stream:
        last = w.index
        if w.index < start or w.index % world != rank:
            continue
        group.append(w)
        if len(group) == pool_size:
            yield Pool(tuple(bucket(group, batch_tokens=batch_tokens, pad_id=pad_id)), w.index + 1)
            group = []
    if group or last + 1 > start:
        yield Pool(tuple(bucket(group, batch_tokens=batch_tokens, pad_id=pad_id)), last + 1)
