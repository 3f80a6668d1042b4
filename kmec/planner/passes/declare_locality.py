"""Pass ``declare_locality``: the prompts each step must leave alone (its declared locality set).

A spec declares where an edit must *not* reach in two ways: each edit's
``preserve`` prompts, and locality claims that sample neighbours of a relation
(``claim locality >= 0.9 sample 200 neighbours of capital``, or a locality
claim without ``neighbours of``, which samples the edit's own relation). The
verifier draws those neighbours from the relation's listed subjects (inline
and ``subjects from``) rendered into its prompt templates, so the compiler
may use them too: they are part of the contract. This pass writes them into
``Step.protect`` — the edits' preserve prompts, then for each relation a
locality claim names, its forward templates (prompt and paraphrases) rendered
with every listed subject that no edit of the spec changes — in a fixed
order, at most :data:`MAX_PROTECT` per step.

Backends whose record says they use ``locality`` receive them: ROME, MEMIT
and AlphaEdit keep those prompts' MLP keys in place (a protected-key term in
the solve); fine-tuning takes them as KL anchors, the codebook memory as
negatives its radii shrink away from, the retrieval memory as negatives its
scope thresholds are calibrated against. Held-out locality — neighbours the
spec does not list — stays with the verifier.
"""

from __future__ import annotations

from pathlib import Path

from kmec.errors import PlanError, SpecError
from kmec.grammar import subjects_of
from kmec.grammar.templates import inspect, render
from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft
from kmec.planner.model import Reason
from kmec.spec import Spec, TripleEdit

MAX_PROTECT = 512  # prompts per step: enough for a relation's listed subjects × templates


def neighbour_prompts(spec: Spec, *, root: str | Path | None = None) -> tuple[str, ...]:
    """The declared neighbours: for each relation a locality claim samples, its forward
    templates rendered with its listed subjects that no edit changes (spec order).

    ``root``: the folder ``subjects from`` files must lie under (default: the spec's
    repository, see :mod:`kmec.grammar.files`).

    Raises:
        PlanError: a ``subjects from`` file cannot be read.
    """
    out: list[str] = []
    names: list[str] = []
    for claim in spec.claims:
        if claim.metric != "locality":
            continue
        if claim.neighbours_of is not None:
            names.append(claim.neighbours_of)
        else:  # the verifier samples each triple edit's own relation
            names += [e.relation for e in spec.edits if isinstance(e, TripleEdit)]
    for name in dict.fromkeys(names):
        rel = spec.relation(name)
        if rel is None:
            continue
        edited = {e.subject for e in spec.edits if isinstance(e, TripleEdit) and e.relation == name}
        try:
            subjects = [s for s in subjects_of(spec, rel, root=root) if s not in edited]
        except SpecError as e:
            raise PlanError(f"relation {name!r}: {e.diagnostics[0].message}",
                            hint=e.diagnostics[0].hint) from None
        templates = [t for t in (rel.prompt, *rel.paraphrases)
                     if "object" not in inspect(t).variables]
        out += [render(t, subject=s) for s in subjects for t in templates]
    return tuple(dict.fromkeys(out))


def declare_locality(draft: Draft, facts: ModelFacts) -> Draft:
    """Set ``protect`` on the steps of backends whose record says they keep it (``locality``).

    >>> from kmec.planner.draft import example_backends, example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec(), backends=example_backends()), example_facts())
    >>> d = declare_locality(group_edits(d.update(backend="memit"), example_facts()),
    ...                      example_facts())
    >>> d.steps[0].protect
    ('The capital of Russia is',)
    """
    neighbours = neighbour_prompts(draft.spec)
    for i, step in enumerate(draft.steps):
        if "locality" not in draft.info(step.backend).uses:
            continue
        scope = {e.prompt for e in step.edits} | {p for e in step.edits for p in e.scope}
        preserve = [p for e in step.edits for p in e.preserve]
        prompts = [p for p in dict.fromkeys(preserve + list(neighbours)) if p not in scope]
        kept = tuple(prompts[:MAX_PROTECT])
        if not kept:
            continue
        n_pre = sum(1 for p in kept if p in set(preserve))
        because = (f"the spec declares {len(prompts)} prompt(s) whose output must not move "
                   f"({n_pre} preserve prompt(s), {len(kept) - n_pre} neighbour prompt(s) of "
                   "the relations its locality claims sample); the update keeps their MLP keys "
                   "where they were")
        if len(prompts) > len(kept):
            because += f"; the first {MAX_PROTECT} are used"
        reason = Reason(choice=f"protect {len(kept)} declared prompt(s)", because=because)
        draft = draft.replace_step(i, step.model_copy(
            update={"protect": kept, "reasons": (*step.reasons, reason)}))
    return draft
