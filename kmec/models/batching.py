"""Right-padded token batches.

Contents:
    right_pad()   token id lists -> (input_ids, attention_mask), padded on the right
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``seqs`` as one ``[len(seqs), longest]`` batch and its attention mask.

    Every sequence starts at column 0; the columns after it hold ``pad_id``
    with mask 0 (a causal model's real positions never see them).

    >>> ids, mask = right_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if not seqs:
        raise ValueError("right_pad needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
