"""Claims turned into probes: what to ask the models about each edit.

Contents:
    Check             a prompt, the answer expected after the edit, and the old answer
    Case              one user edit with every probe its claims need
    build_cases()     Spec (+ Plan) -> one Case per user edit, in plan order
    claims_of()       the spec's claims, or the default ones when it declares none
    not_applicable()  why a claim says nothing about an edit (None if it applies)
    claim_label()     a short, stable name for a claim ("locality[kl<=0.1]")
    in_scope()        prompts some edit declares in scope (never locality probes)
    compiled_prompts() every prompt the compiler was shown (declared, not held out)

The spec being verified supplies every probe (rendered as the planner renders
it); the plan says which step made each edit and which prompts the compiler
was shown (:func:`compiled_prompts`). The two may differ: ``kmec verify BUILD
--spec TWIN.kmec`` scores the compiled edits on a twin spec's prompts (same
edits, other paraphrases and neighbours), which is how held-out
generalisation is measured. Its edits must be the plan's (same prompt and
targets). Paired inverse edits
(``name~reverse``) are how reversal is implemented, not user edits: their
effect is checked by the reversal claim of the edit they belong to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from kmec.errors import KmecError, VerifyError
from kmec.grammar.templates import render
from kmec.planner.model import EditRequest, Plan
from kmec.spec import Claim, PromptEdit, Spec, TripleEdit

DEFAULT_CLAIMS: tuple[Claim, ...] = (
    Claim(metric="efficacy", threshold=1.0),
    Claim(metric="locality", threshold=0.9, sample=20),
)


class Check(BaseModel):
    """A prompt and what should follow it after the edit (``old``: before it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    target: str
    old: str | None = None


class Case(BaseModel):
    """One user edit and the probes its claims are evaluated on.

    Attributes:
        name: the edit's name.
        kind: ``triple`` or ``prompt`` (free-form).
        subject, relation: for triple edits (subject also for keyed free-form ones).
        efficacy: the edit prompt -> new target (old target when declared).
        generality: in-scope prompts (rendered paraphrases + declared scope).
        preserve: declared prompts whose output must not change.
        portability: declared related questions with their expected answers.
        reversal: the reverse question (object = new) -> subject, when expected.
        step, step_index: the plan step that made the edit, and its position.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["triple", "prompt"]
    subject: str | None = None
    relation: str | None = None
    efficacy: Check
    generality: tuple[Check, ...] = ()
    preserve: tuple[str, ...] = ()
    portability: tuple[Check, ...] = ()
    reversal: tuple[Check, ...] = ()
    expect_reversal: bool = False
    step: str | None = None
    step_index: int = 0


def _edit_of(spec: Spec, name: str) -> TripleEdit | PromptEdit:
    for e in spec.edits:
        if e.name == name:
            return e
    raise VerifyError(f"the plan edits {name!r}, which the spec does not declare",
                      hint="verify the build against the spec it was compiled from "
                      "(drop --spec, or recompile)")


def _reverse(spec: Spec, edit: TripleEdit | PromptEdit) -> tuple[Check, ...]:
    if not isinstance(edit, TripleEdit):
        return ()
    rel = spec.relation(edit.relation)
    if rel is None or rel.reverse is None:
        return ()
    prompt = render(rel.reverse, subject=edit.subject, object=edit.new)
    return (Check(prompt=prompt, target=edit.subject),)


def _portability(edit: TripleEdit | PromptEdit) -> tuple[Check, ...]:
    """The edit's portability probes, used as written (they are not templates)."""
    return tuple(Check(prompt=p.prompt, target=p.target) for p in edit.portability)


def _request_from_spec(spec: Spec, edit: TripleEdit | PromptEdit) -> EditRequest:
    """What the planner's resolve pass renders, for verifying without a plan."""
    if isinstance(edit, PromptEdit):
        return EditRequest(name=edit.name, prompt=edit.prompt, subject=edit.subject,
                           target_new=edit.target, target_old=edit.old, scope=edit.scope)
    rel = spec.relation(edit.relation)
    if rel is None:
        raise VerifyError(f"edit {edit.name!r} uses relation {edit.relation!r}, "
                          "which the spec does not declare")
    prompt = render(rel.prompt, subject=edit.subject)
    scope = tuple(render(t, subject=edit.subject) for t in rel.paraphrases) + edit.scope
    return EditRequest(name=edit.name, prompt=prompt, subject=edit.subject, target_new=edit.new,
                       target_old=edit.old,
                       scope=tuple(p for p in dict.fromkeys(scope) if p != prompt))


def _case(spec: Spec, req: EditRequest, step: str | None, index: int) -> Case:
    edit = _edit_of(spec, req.name)
    scope = tuple(Check(prompt=p, target=req.target_new, old=req.target_old) for p in req.scope)
    return Case(
        name=req.name,
        kind=edit.kind,
        subject=edit.subject,
        relation=edit.relation if isinstance(edit, TripleEdit) else None,
        efficacy=Check(prompt=req.prompt, target=req.target_new, old=req.target_old),
        generality=scope,
        preserve=tuple(dict.fromkeys(edit.preserve)),
        portability=_portability(edit),
        reversal=_reverse(spec, edit) if edit.expect_reversal else (),
        expect_reversal=edit.expect_reversal,
        step=step,
        step_index=index,
    )


def build_cases(spec: Spec, plan: Plan | None = None) -> tuple[Case, ...]:
    """One :class:`Case` per user edit: in plan order, or spec order without a plan.

    The probes come from ``spec``; the plan gives the order and the steps.

    Raises:
        VerifyError: the plan names an edit the spec lacks, the spec's edit is not the
            one compiled (another prompt or target), or a template fails.
    """
    if plan is None:
        return tuple(_case(spec, _request_from_spec(spec, e), None, i)
                     for i, e in enumerate(spec.edits))
    cases = []
    for i, step in enumerate(plan.steps):
        for compiled in step.edits:
            if compiled.inverse:
                continue
            req = _request_from_spec(spec, _edit_of(spec, compiled.name))
            if (req.prompt, req.target_new) != (compiled.prompt, compiled.target_new):
                raise VerifyError(
                    f"edit {req.name!r} of the spec asks {req.prompt!r} -> {req.target_new!r}, "
                    f"but the build compiled {compiled.prompt!r} -> {compiled.target_new!r}",
                    hint="a spec given with --spec must declare the same edits as the build's "
                    "(it may change their scope, preserve prompts and claims); else recompile")
            cases.append(_case(spec, req, step.id, i))
    return tuple(cases)


def compiled_prompts(plan: Plan | None, spec: Spec, *,
                     root: str | Path | None = None) -> frozenset[str]:
    """Every prompt the compiler was shown: the plan's edit prompts, scope, preserve and
    protected prompts (inverse edits included). A score on these shows that the contract
    holds; only prompts outside this set measure generalisation. Without a plan, the
    prompts ``spec`` declares (edit prompts, scope, preserve, reverse and portability
    questions, the neighbours its locality claims list, read under ``root``): the
    compiler may have used any of them."""
    from kmec.planner.passes.declare_locality import neighbour_prompts

    out: set[str] = set()
    if plan is not None:
        for step in plan.steps:
            out.update(step.protect)
            for r in step.edits:
                out.add(r.prompt)
                out.update(r.scope)
                out.update(r.preserve)
        return frozenset(out)
    cases = build_cases(spec, None)
    out.update(in_scope(cases))
    for c in cases:
        out.update(c.preserve)
    try:
        out.update(neighbour_prompts(spec, root=root))
    except KmecError:  # an unreadable subjects file: the verifier reports it where it reads it
        pass
    return frozenset(out)


def claims_of(spec: Spec) -> tuple[tuple[Claim, bool], ...]:
    """The claims to check, each with ``declared``: the spec's own, or
    :data:`DEFAULT_CLAIMS` (efficacy ≥ 1 and locality ≥ 0.9 on 20 samples)
    when the spec declares none."""
    if spec.claims:
        return tuple((c, True) for c in spec.claims)
    return tuple((c, False) for c in DEFAULT_CLAIMS)


def not_applicable(claim: Claim, case: Case, order: str, last_step: int) -> str | None:
    """Why ``claim`` does not apply to ``case``; None when it applies."""
    m = claim.metric
    if m == "generality" and not case.generality:
        return "the edit has no in-scope paraphrases or scope prompts"
    if m == "portability" and not case.portability:
        return "the edit declares no portability probes"
    if m == "reversal" and not case.reversal:
        return "the edit does not declare `expect reversal`"
    if m == "retention":
        if order != "sequence":
            return "retention applies to `order sequence` only (edits here are one batch)"
        if case.step_index >= last_step:
            return "the edit is in the last step: no later edit could have undone it"
    return None


def claim_label(claim: Claim) -> str:
    """A short stable label: metric, protocol when not ``prob``, KL budget.

    >>> claim_label(Claim(metric="locality", threshold=0.9, kl=0.1))
    'locality[kl<=0.1]'
    >>> claim_label(Claim(metric="efficacy", threshold=1.0, protocol="token"))
    'efficacy[token]'
    >>> claim_label(Claim(metric="generality", threshold=0.8, heldout=True))
    'generality[heldout]'
    """
    parts = []
    if claim.protocol != "prob":
        parts.append(claim.protocol)
    if claim.neighbours_of:
        parts.append(f"of={claim.neighbours_of}")
    if claim.kl is not None:
        parts.append(f"kl<={claim.kl:g}")
    if claim.heldout:
        parts.append("heldout")
    return claim.metric + (f"[{','.join(parts)}]" if parts else "")


def in_scope(cases: Sequence[Case]) -> frozenset[str]:
    """Every prompt some edit declares in scope: edit prompts, paraphrases,
    scope prompts, reverse and portability questions (they are meant to move)."""
    out: set[str] = set()
    for c in cases:
        out.add(c.efficacy.prompt)
        out.update(p.prompt for p in c.generality + c.reversal + c.portability)
    return frozenset(out)
