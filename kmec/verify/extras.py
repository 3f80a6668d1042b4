"""Checks beyond the claims: weight audit, partial applications, CounterFact+.

Contents:
    audit_section()  the weight-diff audit of the edited model against the artifact
    step_scores()    each edit's efficacy on a model with only some steps applied
                     (after its own step: retention; its step alone: scalability)
    plus_items()     neighbourhood prompts with the edit statement prepended
    plus_rows()      their KL and top-1 agreement per edit

CounterFact+ (Hoelscher-Obermaier et al., *Detecting Edit Failures In Large
Language Models: An Improved Specificity Benchmark*, 2023) showed that
locate-then-edit methods often leak the new fact into unrelated prompts once
the edit statement is in the context ("The capital of France is Lyon. The
capital of Spain is" -> " Lyon"). kmec reports this neighbourhood KL for
every edit; it does not gate on it, since most parametric methods fail it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kmec.artifacts import Artifact, apply, audit, select
from kmec.grammar import subjects_of
from kmec.grammar.templates import render
from kmec.models.chat import ChatFrame
from kmec.spec import Spec
from kmec.verify import canaries, metrics
from kmec.verify.claims import Case
from kmec.verify.report import AuditSection, PlusRow
from kmec.verify.scoring import Item, ScoreCache, score_items, spaced

PLUS_NEIGHBOURS = 4  # neighbour prompts per edit with the edit statement prepended


def audit_section(base: Any, edited: Any, artifact: Artifact | None) -> AuditSection:
    """Run :func:`kmec.artifacts.audit`; any undeclared moved parameter fails."""
    if artifact is None:
        return AuditSection(ran=False, summary="no artifact given: weight audit skipped")
    r = audit(base, edited, artifact)
    return AuditSection(ran=True, ok=r.ok, declared=artifact.manifest.params,
                        undeclared=r.undeclared, mismatched=r.mismatched, checked=r.checked,
                        max_error=float(f"{r.max_error:.3g}"), summary=r.summary())


def _efficacy_on(model: Any, tok: Any, cases: Sequence[Case],
                 chat: ChatFrame | None = None) -> dict[str, float]:
    items = []
    for c in cases:
        items.append(Item(c.efficacy.prompt, c.efficacy.target))
        if c.efficacy.old is not None:
            items.append(Item(c.efficacy.prompt, c.efficacy.old))
    scores = dict(zip(items, (s[0] for s in score_items([model], tok, items, chat=chat))))
    out = {}
    for c in cases:
        old = scores[Item(c.efficacy.prompt, c.efficacy.old)] if c.efficacy.old is not None else None
        out[c.name] = metrics.probe_value(scores[Item(c.efficacy.prompt, c.efficacy.target)], old)
    return out


def step_scores(base: Any, tok: Any, cases: Sequence[Case], artifact: Artifact | None,
                order: str, *, retention: bool,
                chat: ChatFrame | None = None) -> dict[str, float]:
    """Efficacy (``prob`` protocol) of edits on partially edited models.

    ``order sequence`` (when a retention claim is declared): each edit right
    after its own step (steps up to and including it applied). ``order
    batch``: each edit whose step holds no other user edit, with that step
    alone applied. Empty when the artifact has fewer than two steps.
    """
    if artifact is None:
        return {}
    step_ids = list(dict.fromkeys(e.step for e in artifact.manifest.payloads))
    if len(step_ids) < 2 or (order == "sequence" and not retention):
        return {}
    scratch = copy.deepcopy(base)
    out: dict[str, float] = {}
    for i, step in enumerate(step_ids):
        mine = [c for c in cases if c.step == step]
        if not mine or (order == "batch" and len(mine) > 1):
            continue
        if order == "sequence" and i == len(step_ids) - 1:
            continue  # the last step's edits are scored on the full model anyway
        keep = set(step_ids[: i + 1]) if order == "sequence" else {step}
        applied = apply(select(artifact, steps=keep), scratch, check=False, tok=tok)
        try:
            out.update(_efficacy_on(scratch, tok, mine, chat))
        finally:
            applied.revert()
    return out


def plus_items(spec: Spec, cases: Sequence[Case], *,
               root: str | Path | None = None) -> list[tuple[str, str]]:
    """``(edit, "<edit prompt> <new>. <neighbour prompt>")`` for up to
    :data:`PLUS_NEIGHBOURS` neighbours per edit (unedited subjects of its
    relation, or general questions for free-form edits)."""
    out = []
    for case in cases:
        rel = spec.relation(case.relation) if case.relation else None
        neighbours: list[str] = []
        if rel is not None:
            edited = {c.subject for c in cases if c.relation == rel.name}
            subjects = [s for s in subjects_of(spec, rel, root=root) if s not in edited]
            neighbours = [render(rel.prompt, subject=s) for s in subjects[:PLUS_NEIGHBOURS]]
        if not neighbours:
            neighbours = list(canaries.GENERAL_QUESTIONS[:PLUS_NEIGHBOURS])
        p = case.efficacy
        statement = f"{p.prompt}{spaced(p.prompt, p.target)}."
        out += [(case.name, f"{statement} {n}") for n in neighbours]
    return out


def plus_rows(plus: Sequence[tuple[str, str]], cache: ScoreCache, dec: Any) -> tuple[PlusRow, ...]:
    """Mean/max KL and top-1 agreement of the prefixed prompts, per edit."""
    rows = []
    for name in dict.fromkeys(n for n, _ in plus):
        prompts = [p for n, p in plus if n == name]
        scores = [cache.get(Item(p)) for p in prompts]
        kls = [e.kl for _, e in scores]
        agree = [b.top1 == e.top1 for b, e in scores]
        rows.append(PlusRow(edit=name, n=len(prompts), mean_kl=round(sum(kls) / len(kls), 6),
                            max_kl=round(max(kls), 6), top1_agreement=round(sum(agree) / len(agree), 6),
                            example=prompts[0]))
    return tuple(rows)
