"""Pass ``group_edits``: split the edits into steps (one backend call each) and name them.

* ``order sequence`` or a method that takes one edit per step (ROME, ``batches=False``): one step per edit, in spec
  order, each inverse edit right after its edit;
* otherwise one batch step, chunked at the backend's ``max_batch`` edits (its
  record; MEMIT's is 10,000, the largest batch its paper evaluates in one
  solve). An edit and its inverse never straddle a chunk boundary.

Step ids are ``s01-memit``, ``s02-memit``, ... (zero-padded to at least two
digits), so they are stable for the same spec.
"""

from __future__ import annotations

from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft, DraftEdit
from kmec.planner.model import Reason, Step


def step_id(index: int, total: int, backend: str) -> str:
    """Stable id of step ``index`` (0-based) out of ``total``.

    >>> step_id(0, 3, "memit"), step_id(99, 120, "rome")
    ('s01-memit', 's100-rome')
    """
    width = max(2, len(str(total)))
    return f"s{index + 1:0{width}d}-{backend}"


def _units(edits: tuple[DraftEdit, ...]) -> list[list[DraftEdit]]:
    """Consecutive edits from one spec edit (an edit and its inverse) form one unit."""
    units: list[list[DraftEdit]] = []
    for edit in edits:
        if units and units[-1][0].source == edit.source:
            units[-1].append(edit)
        else:
            units.append([edit])
    return units


def _chunks(edits: tuple[DraftEdit, ...], limit: int) -> list[list[DraftEdit]]:
    chunks: list[list[DraftEdit]] = [[]]
    for unit in _units(edits):
        if chunks[-1] and len(chunks[-1]) + len(unit) > limit:
            chunks.append([])
        chunks[-1].extend(unit)
    return chunks


def _grouping(draft: Draft, backend: str) -> tuple[list[list[DraftEdit]], str]:
    n = len(draft.edits)
    if draft.spec.order == "sequence":
        return [[e] for e in draft.edits], (
            f"`order sequence`: {n} steps, one per edit, applied in spec order")
    info = draft.info(backend)
    if not info.batches:
        return [[e] for e in draft.edits], (
            f"{backend} edits one fact per call: {n} step(s), one per edit, in spec order")
    limit = info.max_batch
    if limit is None or n <= limit:
        return [list(draft.edits)], f"all {n} edit(s) in one {backend} batch step"
    chunks = _chunks(draft.edits, limit)
    return chunks, (f"{n} edits exceed {limit:,}, the largest batch {backend} was evaluated at "
                    f"in one solve (Meng et al. 2023): {len(chunks)} consecutive batch steps")


def group_edits(draft: Draft, facts: ModelFacts) -> Draft:
    """Turn the resolved edits into steps with stable ids.

    >>> from kmec.planner.draft import example_backends, example_facts, example_spec
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec(), backends=example_backends()), example_facts())
    >>> [s.id for s in group_edits(d.update(backend="rome"), example_facts()).steps]
    ['s01-rome', 's02-rome']
    """
    backend = draft.backend
    if backend is None or not draft.edits:
        return draft
    groups, because = _grouping(draft, backend)
    grouping = Reason(choice=f"{len(groups)} step(s)", because=because)
    steps = []
    for i, group in enumerate(groups):
        edit_reasons = tuple(r for e in group for r in e.reasons)
        steps.append(Step(
            id=step_id(i, len(groups), backend),
            backend=backend,
            edits=tuple(e.request for e in group),
            reasons=(*draft.backend_reasons, grouping, *edit_reasons),
        ))
    return draft.update(steps=tuple(steps))
