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
from kmec.planner.draft import Draft
from kmec.planner.layers import LayerChoice, Role, check_layers, default_layers, layer_span
from kmec.planner.model import Reason

ROLE: dict[str, Role] = {
    "rome": "rome",
    "memit": "memit",
    "alphaedit": "memit",
    "ft": "memit",
    "memory": "rome",
    "mend": "mend",
}


# backends whose payloads change the MLP output projection of each of their layers
WRITES_MLP_OUT = ("rome", "memit", "alphaedit", "ft", "mend")

NO_LAYERS = {
    "retrieval": "the retrieval memory reads the input text and answers in context: it edits "
                 "no layer",
}

BORROWED = {
    "memory": "the codebook keys each edit on its subject's last token, as ROME does, so it "
              "sits at ROME's layer rather than GRACE's late one (measured on SmolLM2-135M, 20 "
              "CounterFact edits held out: layer 5 efficacy 1.00, paraphrase 0.93; layer 25 "
              "0.60, 0.28)",
    "alphaedit": "AlphaEdit edits MEMIT's layers (as in its paper)",
    "ft": "constrained fine-tuning spreads its bounded change over MEMIT's range of "
          "mid-early MLPs, where subject-keyed facts are stored",
}


def _choice(draft: Draft, facts: ModelFacts, backend: str) -> LayerChoice:
    given = draft.spec.method.layers
    if backend in NO_LAYERS:
        return LayerChoice(layers=(), because=NO_LAYERS[backend] + (
            "; the spec's `layers` do not apply" if given is not None else ""))
    if given is not None:
        layers = check_layers(given, facts)
        return LayerChoice(layers=layers, because=f"the spec gives `layers {layer_span(layers)}`")
    choice = default_layers(facts, ROLE.get(backend, "memit"))
    if backend in BORROWED:
        return LayerChoice(layers=choice.layers, because=f"{BORROWED[backend]}: {choice.because}")
    return choice


def choose_layers(draft: Draft, facts: ModelFacts) -> Draft:
    """Set ``layers`` on every step, with the evidence as a reason, and ``writes``:
    the parameters the step may change.

    Raises:
        PlanError: the spec's layers do not exist in this model.

    >>> from kmec.planner.draft import example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec()), example_facts()).update(backend="memit")
    >>> d = choose_layers(group_edits(d, example_facts()), example_facts())
    >>> d.steps[0].layers, d.steps[0].reasons[-1].choice
    ((4, 5, 6, 7, 8), 'layers 4..8')
    >>> d.steps[0].writes[0]
    'model.layers.4.mlp.down_proj.weight'
    """
    adapter = adapter_for(facts.model_type)
    for i, step in enumerate(draft.steps):
        choice = _choice(draft, facts, step.backend)
        span = layer_span(choice.layers)
        reason = Reason(choice=f"layers {span}" if span else "no layers", because=choice.because)
        writes = tuple(f"{adapter.site('mlp_out', layer)}.weight" for layer in choice.layers) \
            if step.backend in WRITES_MLP_OUT else ()
        draft = draft.replace_step(i, step.model_copy(
            update={"layers": choice.layers, "writes": writes,
                    "reasons": (*step.reasons, reason)}))
    return draft
