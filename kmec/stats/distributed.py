"""Sharding the statistics pass over ``torch.distributed`` ranks.

Contents:
    DistInfo         this process's rank and the world size
    current()        DistInfo of the initialised process group (or 0 of 1)
    init_from_env()  start the process group when launched by torchrun
    all_reduce_moments()  sum accumulators (totals and counts) over ranks
    broadcast()      rank 0's picklable value on every rank
    barrier()        wait for every rank

Run the same code under ``torchrun --nproc-per-node N``: each rank takes
every N-th window of the corpus stream (:mod:`kmec.stats.batches`), adds
its keys locally, and the totals are all-reduced once at the end:

    S = Σ_r S_r,   n = Σ_r n_r,   E[k kᵀ] = S / n

which is exactly the single-process result up to float64 rounding. The
backend is gloo for CPU tensors and nccl for CUDA ones. Without an
initialised process group every function is a no-op for a world of one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kmec.stats.accumulators import SecondMoment

log = logging.getLogger("kmec")
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size (0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def current() -> DistInfo:
    """The rank and world size of the default process group (0 of 1 if none)."""
    if not _active():
        return DistInfo()
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size())


def init_from_env(device: str | torch.device | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a group already
    exists. Uses nccl for CUDA devices and gloo otherwise.

    Args:
        device: the device the pass will run on (chooses the backend).
    """
    if _active():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return DistInfo()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    info = current()
    log.info("distributed statistics: rank %d of %d (%s)", info.rank, info.world, backend)
    return info


def all_reduce_moments(acc: dict[int, SecondMoment]) -> None:
    """Sum every accumulator's total and count over all ranks, in place (sorted by layer)."""
    if not _active():
        return
    layers = sorted(acc)
    if not layers:
        return
    device = acc[layers[0]].device
    counts = torch.tensor([acc[l].count for l in layers], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(counts)
    for l, n in zip(layers, counts.tolist()):
        state = acc[l].state_dict()
        total = state["sum"].to(device)
        torch.distributed.all_reduce(total)
        acc[l].load_state_dict({"sum": total, "count": torch.tensor(round(n))})


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable values)."""
    if not _active():
        return value
    box: list[Any] = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _active():
        torch.distributed.barrier()
