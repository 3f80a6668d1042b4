"""Pass ``choose_params``: each step's hyper-parameters.

The backend's own ``default_params(facts)`` (its documented defaults for the
model's family and size) are merged with what the spec overrides:

* ``max_delta`` (bound on ‖Δ‖/‖W‖): set on backends whose Params have the
  field; refused for a weight-changing backend without it (the plan could not
  honour the bound); noted as trivially true for ``memory`` and ``retrieval``,
  which change no weight;
* ``layers``: mirrored from the step when the Params have a ``layers`` field,
  so the two never disagree;
* ``protect``: under ``order sequence``, when the Params have a ``protect``
  field (AlphaEdit), the name, prompt and subject of every edit of the earlier
  steps, whose keys the step's update must leave unchanged (the backend
  recomputes them on the model, which carries the earlier edits by then).

The merged values are validated by the backend's ``Params`` model and stored
as JSON values.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kmec.errors import PlanError
from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft
from kmec.planner.model import Reason, Step


def _merge(draft: Draft, step: Step, defaults: dict[str, Any],
           earlier: tuple[Step, ...]) -> tuple[dict[str, Any], list[str]]:
    params = dict(defaults)
    notes = []
    bound = draft.spec.method.max_delta
    if bound is not None:
        if "max_delta" in params:
            params["max_delta"] = bound
            notes.append(f"max_delta={bound:g} from the spec")
        elif draft.info(step.backend).changes == "memory":
            notes.append(f"max_delta={bound:g} holds trivially: {step.backend} changes no weights")
        else:
            raise PlanError(
                f"the spec bounds the weight change (max_delta {bound:g}), but the "
                f"{step.backend} backend has no max_delta parameter to enforce it",
                hint="drop max_delta, or choose a method that supports it")
    if "layers" in params:
        params["layers"] = list(step.layers)
        notes.append("layers mirrored from the step")
    if "protect" in params and draft.spec.order == "sequence":
        params["protect"] = [{"name": e.name, "prompt": e.prompt, "subject": e.subject}
                             for s in earlier for e in s.edits]
        if params["protect"]:
            notes.append(f"protects the keys of the {len(params['protect'])} earlier edit(s)")
    return params, notes


def _validate(backend: Any, params: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        return backend.Params.model_validate(params).model_dump(mode="json")
    except ValidationError as e:
        raise PlanError(f"invalid parameters for the {name} backend: {e.errors()[0]['msg']}",
                        hint="check the spec's method options") from None


def choose_params(draft: Draft, facts: ModelFacts) -> Draft:
    """Set ``params`` on every step from the backend's defaults and the spec.

    Raises:
        PlanError: the backend is not registered, or the spec asks for a
            bound the backend cannot enforce.

    >>> from kmec.spec import MethodHint
    >>> from kmec.planner.draft import example_backends, example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> bounded = example_spec().model_copy(update={"method": MethodHint(max_delta=0.01)})
    >>> d = resolve(Draft(spec=bounded, backends=example_backends()), example_facts())
    >>> choose_params(group_edits(d.update(backend="ft"), example_facts()), example_facts())
    Traceback (most recent call last):
    kmec.errors.PlanError: the spec bounds the weight change (max_delta 0.01), but the ft backend has no max_delta parameter to enforce it
      hint: drop max_delta, or choose a method that supports it
    """
    defaults: dict[str, dict[str, Any]] = {}
    for i, step in enumerate(draft.steps):
        draft.info(step.backend)  # registered, or a PlanError naming the known ones
        backend = draft.backends[step.backend]
        if step.backend not in defaults:
            defaults[step.backend] = backend.default_params(facts).model_dump(mode="json")
        params, notes = _merge(draft, step, defaults[step.backend], draft.steps[:i])
        params = _validate(backend, params, step.backend)
        because = f"{step.backend} backend defaults for {facts.family} ({facts.n_layers} layers)"
        if notes:
            because += "; " + "; ".join(notes)
        reason = Reason(choice="params", because=because)
        draft = draft.replace_step(i, step.model_copy(
            update={"params": params, "reasons": (*step.reasons, reason)}))
    return draft
