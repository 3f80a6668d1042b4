"""Pass ``resolve``: render every spec edit into the request a backend receives.

A triple edit ``(subject, relation, old -> new)`` becomes the relation's
prompt rendered with the subject; its scope is the relation's paraphrases
rendered the same way plus the edit's own ``scope`` prompts. A free-form edit
keeps its prompt and target. Each request keeps a ``subject`` span when one is
known, so locate-then-edit methods key the edit on the subject's last token.
"""

from __future__ import annotations

from kmec.errors import PlanError, SpecError, did_you_mean
from kmec.grammar.templates import render
from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft, DraftEdit
from kmec.planner.model import EditRequest
from kmec.spec import PromptEdit, Relation, Spec, TripleEdit


def _render(template: str, what: str, *, subject: str, obj: str | None = None) -> str:
    try:
        return render(template, subject=subject, object=obj)
    except SpecError as e:
        raise PlanError(f"{what}: {e.diagnostics[0].message}", hint=e.diagnostics[0].hint) from e


def _relation(spec: Spec, edit: TripleEdit) -> Relation:
    relation = spec.relation(edit.relation)
    if relation is None:
        raise PlanError(f"edit {edit.name!r} uses relation {edit.relation!r}, "
                        "which the spec does not declare",
                        hint=did_you_mean(edit.relation, [r.name for r in spec.relations])
                        or "declare it with: relation NAME { prompt \"... {{ subject }} ...\" }")
    return relation


def _triple(spec: Spec, edit: TripleEdit) -> DraftEdit:
    rel = _relation(spec, edit)
    where = f"edit {edit.name!r} (relation {rel.name!r})"
    prompt = _render(rel.prompt, f"{where} prompt", subject=edit.subject)
    if edit.subject not in prompt:
        raise PlanError(f"{where}: the prompt {prompt!r} does not contain the subject "
                        f"{edit.subject!r}, so the edit cannot be keyed on it",
                        hint="put {{ subject }} in the relation's prompt template")
    paraphrases = tuple(_render(t, f"{where} paraphrase", subject=edit.subject)
                        for t in rel.paraphrases)
    reverse = None
    if rel.reverse is not None:
        reverse = _render(rel.reverse, f"{where} reverse", subject=edit.subject, obj=edit.new)
    request = EditRequest(name=edit.name, prompt=prompt, subject=edit.subject,
                          target_new=edit.new, target_old=edit.old,
                          scope=_unique(paraphrases + edit.scope, prompt),
                          preserve=tuple(dict.fromkeys(edit.preserve)))
    return DraftEdit(request=request, source=edit.name, expect_reversal=edit.expect_reversal,
                     reverse_prompt=reverse)


def _free_form(edit: PromptEdit) -> DraftEdit:
    if edit.subject is not None and edit.subject not in edit.prompt:
        raise PlanError(f"edit {edit.name!r}: subject {edit.subject!r} does not occur in its "
                        f"prompt {edit.prompt!r}",
                        hint="the subject must be a substring of the prompt (or leave it out "
                        "to key the edit on the prompt's last token)")
    request = EditRequest(name=edit.name, prompt=edit.prompt, subject=edit.subject,
                          target_new=edit.target, target_old=edit.old,
                          scope=_unique(edit.scope, edit.prompt),
                          preserve=tuple(dict.fromkeys(edit.preserve)))
    return DraftEdit(request=request, source=edit.name, free_form=True,
                     keyed=edit.subject is not None, expect_reversal=edit.expect_reversal)


def _unique(prompts: tuple[str, ...], prompt: str) -> tuple[str, ...]:
    """Drop repeats and the edit prompt itself, keeping first occurrences in order."""
    return tuple(p for p in dict.fromkeys(prompts) if p != prompt)


def resolve(draft: Draft, facts: ModelFacts) -> Draft:
    """Render the spec's edits into :class:`EditRequest` values, in spec order.

    Raises:
        PlanError: an unknown relation, a template that fails to render, a
            subject missing from its prompt, or two edits with one name.

    >>> from kmec.planner.draft import example_facts, example_spec
    >>> d = resolve(Draft(spec=example_spec()), example_facts())
    >>> [(e.request.prompt, e.request.target_new) for e in d.edits]
    [('The capital of Kazakhstan is', 'Nur-Sultan'), ('The 2022 World Cup was won by', 'Argentina')]
    >>> d.edits[0].request.scope, d.edits[0].reverse_prompt
    (("Kazakhstan's capital city is",), 'Nur-Sultan is the capital of')
    >>> d.reasons[0].choice
    'resolve 2 edit(s)'
    """
    spec = draft.spec
    seen: set[str] = set()
    edits = []
    for edit in spec.edits:
        if edit.name in seen:
            raise PlanError(f"two edits are called {edit.name!r}",
                            hint="give each edit its own name")
        seen.add(edit.name)
        edits.append(_triple(spec, edit) if isinstance(edit, TripleEdit) else _free_form(edit))
    n_triple = sum(not e.free_form for e in edits)
    because = (f"{n_triple} triple edit(s) rendered from their relation's prompt and paraphrase "
               f"templates; {len(edits) - n_triple} free-form edit(s) used as written")
    draft = draft.update(edits=tuple(edits)).note(f"resolve {len(edits)} edit(s)", because)
    if spec.chat is not None:
        system = (f"with the system message {spec.chat.system!r}" if spec.chat.system is not None
                  else "with the template's own system message, if it has one")
        draft = draft.note("chat template", "`chat on`: edit, scope and preserve prompts are "
                           f"asked as a user turn of the model's chat template ({system}) and "
                           "the target is the assistant's answer; the prompts are wrapped when "
                           "the steps run, where the tokenizer is")
    return draft
