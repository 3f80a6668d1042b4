"""The planner: ``plan(spec, facts) -> Plan``, a tuple of small pure passes.

Contents:
    PASSES   the passes, in order (see :mod:`kmec.planner.passes`)
    plan()   run them and freeze the result into a :class:`~kmec.planner.model.Plan`

The planner sees a model only through :class:`~kmec.models.facts.ModelFacts`
and backends only through the registry it is given: each entry's torch-free
record (``info``, :class:`~kmec.planner.backend_info.BackendInfo`), its
``Params`` and ``default_params``. It imports no backend and needs no
weights. Same spec + same facts + same kmec version + same registry defaults
give byte-identical ``plan.to_json()``.

The pass order differs from the first sketch in STYLE.md in two places:
``choose_backend`` runs before ``group_edits`` (how edits are grouped depends on
the method: ROME takes one edit per call) and ``pair_reversals`` runs before
``group_edits`` (inverse edits are grouped like any other). ``choose_params``
is a pass of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft, Pass
from kmec.planner.model import Plan
from kmec.planner.passes import (
    choose_backend,
    choose_layers,
    choose_params,
    declare_locality,
    estimate_cost,
    group_edits,
    pair_reversals,
    require_stats,
    resolve,
    share_scope,
)
from kmec.spec import Spec

PASSES: tuple[Pass, ...] = (
    resolve,
    choose_backend,
    share_scope,
    pair_reversals,
    group_edits,
    choose_layers,
    choose_params,
    declare_locality,
    require_stats,
    estimate_cost,
)


def plan(
    spec: Spec,
    facts: ModelFacts,
    *,
    backends: Mapping[str, Any],
    editors: Collection[str] = (),
    kmec_version: str | None = None,
) -> Plan:
    """Compile a spec into a plan for the model described by ``facts``.

    Args:
        spec: the parsed spec.
        facts: the model's facts (no weights needed).
        backends: the backend registry (name -> backend), e.g.
            :data:`kmec.backends.BACKENDS`; the planner reads each entry's ``info``.
        editors: fingerprints or names of models that have a trained MEND editor.
        kmec_version: version stamped into the plan; default ``kmec.__version__``.

    Returns:
        The plan, every step with its reasons.

    Raises:
        PlanError: the spec cannot be satisfied (the message says why and what to do).

    >>> from kmec.planner.draft import example_facts, example_spec
    >>> plan(example_spec(), example_facts(), backends={})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    kmec.errors.PlanError: backend 'ft' is not available in this installation (registered: none)
    ...
    """
    if kmec_version is None:
        from kmec._version import __version__ as kmec_version
    draft = Draft(spec=spec, backends=dict(backends), editors=frozenset(editors),
                  kmec_version=kmec_version)
    for step in PASSES:
        draft = step(draft, facts)
    return draft.to_plan(facts)


__all__ = ["PASSES", "Draft", "plan"]
