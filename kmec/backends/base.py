"""The backend interface: two methods over the payload types of :mod:`kmec.artifacts`.

Contents:
    StatsProvider  what backends call to get second moments
    ExecContext    everything ``execute`` may use (no globals)
    Backend        Protocol: ``name``, ``Params``, ``default_params``, ``execute``

Backends never mutate the model they are given: they return payloads, and
only :mod:`kmec.artifacts` writes weights. ``u`` lives in the output space of
the edited module (d_model for ``mlp_out``) and ``v`` in its input space (the
key space), whatever the module's storage layout; the ArchAdapter's
``weight_layout`` tells the artifact code how to add ``u vᵀ``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel

from kmec.artifacts.payloads import Payload
from kmec.models.adapters import ArchAdapter
from kmec.models.facts import ModelFacts
from kmec.planner.model import Step
from kmec.progress import Progress


@runtime_checkable
class StatsProvider(Protocol):
    """Gives backends the second moment ``E[k kᵀ]`` of a layer's MLP keys."""

    def second_moment(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_mlp] float32 (or float64) matrix for ``layer``."""
        ...


@dataclass
class ExecContext:
    """Everything a backend's ``execute`` may use.

    Attributes:
        model, tok: the base model (must not be mutated) and tokenizer.
        adapter: architecture sites for ``model``.
        facts: the model's facts.
        stats: second moments (None when the step needs none).
        cache_dir: where backends may keep content-addressed intermediates
            (None: compute everything afresh).
        weights: names the weights ``model`` holds — the base fingerprint, or
            a hash of it and the steps applied before (``order sequence``);
            "" when unknown, which turns off caches keyed by the weights.
        seed: the plan's seed.
        progress: ``progress(message, done, total)`` callback for long work.
    """

    model: Any
    tok: Any
    adapter: ArchAdapter
    facts: ModelFacts
    stats: StatsProvider | None = None
    cache_dir: Path | None = None
    weights: str = ""
    seed: int = 0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("kmec"))
    progress: Progress | None = None


class Backend(Protocol):
    """An editing method."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def default_params(self, facts: ModelFacts) -> BaseModel:
        """Documented defaults for this model family/size."""
        ...

    def execute(self, step: Step, ctx: ExecContext) -> Sequence[Payload]:
        """Compute the payloads for ``step``; must not mutate ``ctx.model``."""
        ...
