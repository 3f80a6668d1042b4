"""Pass ``pair_reversals``: add the inverse edit that a reversal claim needs.

Editing ``Kazakhstan --capital--> Nur-Sultan`` teaches the model the forward
direction only (the "reversal curse": a model trained on "A is B" does not
learn "B is A"). An edit that says ``expect reversal`` therefore gets a paired
inverse edit, placed right after it: the relation's ``reverse`` template
rendered with ``object = new`` ("Nur-Sultan is the capital of") with the
subject as its target, keyed on the new object. It is an ordinary edit from
here on, so the grouping pass puts it in the same batch (MEMIT, memory, FT,
MEND) or in the next step (ROME, sequential order).

This pass runs before ``group_edits`` (not after ``choose_layers`` as first
sketched in STYLE.md) so that grouping, layers, statistics and cost all see
the inverse edits without a second grouping pass. The method was chosen from
the user's edits alone: the inverse edits do not tip one edit into a batch.
"""

from __future__ import annotations

from kmec.errors import PlanError
from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft, DraftEdit
from kmec.planner.model import EditRequest, Reason

INVERSE_SUFFIX = "~reverse"


def _inverse(edit: DraftEdit) -> DraftEdit:
    req = edit.request
    if edit.free_form or edit.reverse_prompt is None:
        why = ("it is a free-form edit, which has no relation" if edit.free_form
               else "its relation declares no `reverse` template")
        raise PlanError(
            f"edit {edit.source!r} expects reversal, but {why} to phrase the reverse question",
            hint="write the edit as `subject ... relation R old -> new` with a relation that "
            "has `reverse \"{{ object }} is ... of\"`")
    prompt = edit.reverse_prompt
    key = req.target_new if req.target_new in prompt else None
    inverse = EditRequest(name=f"{req.name}{INVERSE_SUFFIX}", prompt=prompt, subject=key,
                          target_new=req.subject or "", inverse=True)
    because = (f"edit {req.name!r} expects reversal: edits teach one direction only, so the "
               f"inverse {prompt!r} -> {inverse.target_new!r} is inserted as its own edit")
    return DraftEdit(request=inverse, source=edit.source, keyed=key is not None,
                     reasons=(Reason(choice=f"pair inverse edit {inverse.name}", because=because),))


def pair_reversals(draft: Draft, facts: ModelFacts) -> Draft:
    """Insert a paired inverse edit after every edit that expects reversal.

    Raises:
        PlanError: an edit expects reversal but has no reverse template.

    >>> from kmec.planner.draft import example_facts, example_spec
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = pair_reversals(resolve(Draft(spec=example_spec()), example_facts()), example_facts())
    >>> for e in d.edits[:2]:
    ...     print(e.request.name, "|", e.request.prompt, "->", e.request.target_new)
    kazakhstan | The capital of Kazakhstan is -> Nur-Sultan
    kazakhstan~reverse | Nur-Sultan is the capital of -> Kazakhstan
    """
    edits: list[DraftEdit] = []
    pairs = []
    for edit in draft.edits:
        edits.append(edit)
        if edit.expect_reversal:
            edits.append(_inverse(edit))
            pairs.append(edit.source)
    if not pairs:
        return draft
    because = (f"edit(s) {', '.join(pairs)} declare `expect reversal`; each gets a paired "
               f"inverse edit ({INVERSE_SUFFIX}) with the reverse prompt and the subject as target")
    return draft.update(edits=tuple(edits)).note(f"pair {len(pairs)} inverse edit(s)", because)
