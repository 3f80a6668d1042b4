"""Pass ``require_stats``: the key statistics each locate-then-edit step needs.

ROME, MEMIT and AlphaEdit all solve against ``C = E[k kᵀ]``, the second moment
of the MLP keys at the edited layers: ROME and MEMIT to spread the update away
from directions the model uses (never the silent ``C = I``), AlphaEdit to
build the null-space projector. The statistics engine computes every requested
layer in one pass over the corpus and caches by content, so steps that ask for
the same layers share one computation. Memory, fine-tuning and MEND need none.

``DEFAULT_TOKENS`` and ``DEFAULT_MAX_LEN`` are the planner's defaults for the
corpus pass: 100,000 tokens in windows of at most 256 tokens. They are the
same numbers as ``kmec.stats.DEFAULT_TOKENS``/``DEFAULT_MAX_LEN`` (a test keeps
them equal) but are defined here, not imported: the statistics engine sits
downstream of the planner (it consumes StatsRequest and imports torch), and
importing it here would make an import cycle.
"""

from __future__ import annotations

from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft
from kmec.planner.layers import layer_span
from kmec.planner.model import Reason, StatsRequest

DEFAULT_TOKENS = 100_000
DEFAULT_MAX_LEN = 256


def require_stats(draft: Draft, facts: ModelFacts) -> Draft:
    """Attach a :class:`StatsRequest` to every step whose method needs ``E[k kᵀ]``.

    >>> from kmec.planner.draft import example_backends, example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec(), backends=example_backends()), example_facts())
    >>> d = d.update(backend="rome")
    >>> d = group_edits(d, example_facts())
    >>> d = d.update(steps=tuple(s.model_copy(update={"layers": (5,)}) for s in d.steps))
    >>> [s.needs_stats.layers for s in require_stats(d, example_facts()).steps]
    [(5,), (5,)]
    """
    first: dict[StatsRequest, str] = {}
    for i, step in enumerate(draft.steps):
        if not draft.info(step.backend).needs_stats:
            continue
        request = StatsRequest(layers=step.layers, corpus="default", tokens=DEFAULT_TOKENS,
                               max_len=DEFAULT_MAX_LEN, dtype="float32")
        span = layer_span(step.layers)
        if request in first:
            because = f"same statistics as {first[request]} (computed once, cached by content)"
        else:
            first[request] = step.id
            because = (f"{step.backend} solves against C = E[k kᵀ] of the MLP keys at layers "
                       f"{span}: {DEFAULT_TOKENS:,} tokens of the default corpus in sequences "
                       f"of <= {DEFAULT_MAX_LEN}, one pass for all layers, cached by content; "
                       "keys rounded to bf16 for the products (exact in fp32, summed in fp64: "
                       "~2e-4 relative error, far below the sampling error of the estimate)")
        reason = Reason(choice=f"statistics for layers {span}", because=because)
        draft = draft.replace_step(i, step.model_copy(
            update={"needs_stats": request, "reasons": (*step.reasons, reason)}))
    return draft
