"""Pass ``choose_layers``: the layers each step edits.

The spec's ``layers`` win when given (checked against the model's depth);
otherwise the per-architecture table in :mod:`kmec.planner.layers` decides,
by the role each method plays: ROME one mid-early MLP; MEMIT, AlphaEdit (which
reuses MEMIT's layers in its paper) and constrained fine-tuning a range of
mid-early MLPs (fine-tuning spreads its norm-bounded change over the range
that holds the subject-keyed facts); memory the layer its codebook hooks;
MEND the last three MLPs.
"""

from __future__ import annotations

from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft
from kmec.planner.layers import LayerChoice, Role, check_layers, default_layers, layer_span
from kmec.planner.model import Reason

ROLE: dict[str, Role] = {
    "rome": "rome",
    "memit": "memit",
    "alphaedit": "memit",
    "ft": "memit",
    "memory": "memory",
    "mend": "mend",
}


BORROWED = {
    "alphaedit": "AlphaEdit edits MEMIT's layers (as in its paper)",
    "ft": "constrained fine-tuning spreads its bounded change over MEMIT's range of "
          "mid-early MLPs, where subject-keyed facts are stored",
}


def _choice(draft: Draft, facts: ModelFacts, backend: str) -> LayerChoice:
    given = draft.spec.method.layers
    if given is not None:
        layers = check_layers(given, facts)
        return LayerChoice(layers=layers, because=f"the spec gives `layers {layer_span(layers)}`")
    choice = default_layers(facts, ROLE.get(backend, "memit"))
    if backend in BORROWED:
        return LayerChoice(layers=choice.layers, because=f"{BORROWED[backend]}: {choice.because}")
    return choice


def choose_layers(draft: Draft, facts: ModelFacts) -> Draft:
    """Set ``layers`` on every step, with the evidence as a reason.

    Raises:
        PlanError: the spec's layers do not exist in this model.

    >>> from kmec.planner.draft import example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec()), example_facts()).update(backend="memit")
    >>> d = choose_layers(group_edits(d, example_facts()), example_facts())
    >>> d.steps[0].layers, d.steps[0].reasons[-1].choice
    ((4, 5, 6, 7, 8), 'layers 4..8')
    """
    for i, step in enumerate(draft.steps):
        choice = _choice(draft, facts, step.backend)
        reason = Reason(choice=f"layers {layer_span(choice.layers)}", because=choice.because)
        draft = draft.replace_step(i, step.model_copy(
            update={"layers": choice.layers, "reasons": (*step.reasons, reason)}))
    return draft
