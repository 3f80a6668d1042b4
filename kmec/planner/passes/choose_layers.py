"""Pass ``choose_layers``: the layers each step edits.

The spec's ``layers`` win when given (checked against the model's depth);
otherwise the per-architecture table in :mod:`kmec.planner.layers` decides,
by the role each method plays: ROME one mid-early MLP; MEMIT, AlphaEdit (which
reuses MEMIT's layers in its paper) and constrained fine-tuning a range of
mid-early MLPs (fine-tuning spreads its norm-bounded change over the range
that holds the subject-keyed facts); the memory codebook ROME's layer (it
keys on the subject's last token, as ROME does; GRACE's late layer suits its
last-token keys: ``key last`` with explicit ``layers``); MEND the last three
MLPs; the retrieval memory no layer at all.
"""

from __future__ import annotations

from kmec.models.adapters import adapter_for
from kmec.models.facts import ModelFacts
from kmec.planner.backend_info import BackendInfo
from kmec.planner.draft import Draft
from kmec.planner.layers import LayerChoice, check_layers, default_layers, layer_span
from kmec.planner.model import Reason


def _choice(draft: Draft, facts: ModelFacts, info: BackendInfo) -> LayerChoice:
    given = draft.spec.method.layers
    if info.layers == "none":
        because = info.no_layers_note or f"{info.name} edits no layer"
        return LayerChoice(layers=(), because=because + (
            "; the spec's `layers` do not apply" if given is not None else ""))
    if given is not None:
        layers = check_layers(given, facts)
        return LayerChoice(layers=layers, because=f"the spec gives `layers {layer_span(layers)}`")
    choice = default_layers(facts, info.layer_role)
    if info.layer_note:
        return LayerChoice(layers=choice.layers, because=f"{info.layer_note}: {choice.because}")
    return choice


def choose_layers(draft: Draft, facts: ModelFacts) -> Draft:
    """Set ``layers`` on every step, with the evidence as a reason, and ``writes``:
    the parameters the step may change.

    Raises:
        PlanError: the spec's layers do not exist in this model.

    >>> from kmec.planner.draft import example_backends, example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec(), backends=example_backends()), example_facts())
    >>> d = d.update(backend="memit")
    >>> d = choose_layers(group_edits(d, example_facts()), example_facts())
    >>> d.steps[0].layers, d.steps[0].reasons[-1].choice
    ((4, 5, 6, 7, 8), 'layers 4..8')
    >>> d.steps[0].writes[0]
    'model.layers.4.mlp.down_proj.weight'
    """
    adapter = adapter_for(facts.model_type)
    for i, step in enumerate(draft.steps):
        info = draft.info(step.backend)
        choice = _choice(draft, facts, info)
        span = layer_span(choice.layers)
        reason = Reason(choice=f"layers {span}" if span else "no layers", because=choice.because)
        site = info.writes_site if info.changes == "weights" else None
        writes = tuple(f"{adapter.site(site, layer)}.weight" for layer in choice.layers) \
            if site else ()
        draft = draft.replace_step(i, step.model_copy(
            update={"layers": choice.layers, "writes": writes,
                    "reasons": (*step.reasons, reason)}))
    return draft
