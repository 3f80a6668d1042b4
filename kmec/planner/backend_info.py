"""What the planner knows about a backend: a small, torch-free record each backend exports.

Contents:
    Work          a step's own cost: seconds, extra MB, and the parts they are made of
    CostModel     Protocol: ``(step, facts, setup) -> Work``
    BackendInfo   the record: what the backend changes, what it needs, how it uses
                  layers and batches, which parts of a spec it reads, its cost model

The planner's passes read these records (``draft.backends[name].info``)
instead of string tables of method names, so a new backend is one module with
an ``info`` record, one ``Params`` model and one registry line; a test
registers a toy backend and plans with it without touching a planner file.
The choice of a method for ``method auto`` (:mod:`kmec.planner.passes.choose_backend`)
is policy about the built-in methods and names them; everything else reads
records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kmec.models.facts import ModelFacts
from kmec.planner.model import StatsRequest, Step


@dataclass(frozen=True)
class Work:
    """A step's own work (statistics excluded): seconds, extra MB over the weights, parts."""

    seconds: float
    extra_mb: float
    parts: tuple[str, ...]


class CostModel(Protocol):
    """A backend's cost model; ``setup`` is True when the step pays a one-time setup
    (a MEND editor still to be trained)."""

    def __call__(self, step: Step, facts: ModelFacts, setup: bool) -> Work: ...


# scope: trains on the declared in-scope prompts; preserve: uses the edits' preserve prompts
# (anchors, negatives); locality: keeps the declared locality set (Step.protect) in place
Uses = Literal["scope", "preserve", "locality", "reversal"]


@dataclass(frozen=True)
class BackendInfo:
    """What a backend is, for the planner.

    Attributes:
        name: the registry name (``method NAME`` in a spec).
        changes: ``"weights"`` (payloads add to parameters) or ``"memory"`` (an
            external memory: no weight changes, allowed with ``weights frozen``).
        needs_stats: the step solves against ``C = E[k kᵀ]`` of the MLP keys.
        layers: ``"one"`` layer, a ``"range"``, or ``"none"`` (reads text only).
        layer_role: which default layer table it uses (``rome``, ``memit``, ``mend``).
        layer_note: why it uses another method's layers (written into the plan).
        no_layers_note: why it edits no layer (for ``layers == "none"``).
        writes_site: the adapter site whose ``.weight`` it changes at each of
            its layers (the plan's ``Step.writes``); None: no weights.
        batches: one step takes many edits (False: one step per edit).
        max_batch: the most edits one step takes (None: no limit).
        keyed: locate-then-edit: keys an edit on its subject's last token.
        needs_editor: needs a trained editor for the model (MEND).
        uses: the parts of a spec it reads besides the edit prompt and target.
        cost: its cost model (None: the plan says it has none).
        stats_cost: extra seconds on first use of its statistics (AlphaEdit's
            eigendecomposition), or None.
    """

    name: str
    changes: Literal["weights", "memory"]
    needs_stats: bool = False
    layers: Literal["one", "range", "none"] = "range"
    layer_role: Literal["rome", "memit", "memory", "mend"] = "memit"
    layer_note: str | None = None
    no_layers_note: str | None = None
    writes_site: str | None = "mlp_out"
    batches: bool = True
    max_batch: int | None = None
    keyed: bool = False
    needs_editor: bool = False
    uses: frozenset[Uses] = field(default_factory=frozenset)
    cost: CostModel | None = None
    stats_cost: Callable[[StatsRequest, ModelFacts], float] | None = None
