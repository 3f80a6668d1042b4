"""Repair: the ladder of plan changes compile climbs when a declared claim fails.

Contents:
    Miss          one failing check: metric, edit, score, threshold
    Repair        a rung's changed plan, its name and why it was taken
    RUNGS         the ladder, in order
    next_repair() the first rung not yet climbed that answers one of the misses
    costly()      whether a rung re-optimises target values (minutes, not seconds)

After a plan runs, :func:`kmec.pipeline.compile_spec` scores the spec's claims with
the verifier and, while some fail, asks :func:`next_repair` for the next plan. The
ladder is fixed and deterministic: the same misses on the same plan give the same
next plan, so a spec still compiles to the same plan bytes (unless the time budget
cuts the ladder short, which the build log then says). Each rung changes only what
the misses point at, and says so in a :class:`~kmec.planner.model.Reason` on every
step it changes, so ``kmec plan --explain build/plan.json`` shows the repairs:

1. ``realise`` (efficacy, generality, portability, reversal misses): λ, the weight
   of the key statistics in MEMIT's solve, divided by 5 (not below
   :data:`MIN_LAMBDA_REL`). A smaller λ lets each layer's update realise more of
   the target value it was given; the δ themselves are unchanged, so the rung
   costs a solve, not an optimisation.
2. ``weigh`` (the same misses): the edits that fail get 4× the weight of the
   others in MEMIT's least-squares fit (their keys' share of the solve).
3. ``protect`` (locality misses, or the verifier's capability canaries): the
   weight ρ of the declared locality set's keys in the solve times 4.
4. ``weigh-again``, ``realise-again``: rungs 2 and 1 once more, for what still fails.
5. ``broaden`` (generality misses on edits that declare scope prompts): those edits'
   scope prompts get 4× their weight (``value.scope_boost``) in the target-value
   objective and, for MEMIT, in the fit: the target values of the chunks holding them
   are re-optimised (costly).
6. ``optimise`` (efficacy, portability, reversal misses): the failing edits' target
   values are optimised to a stricter early stop (0.97) in up to twice the steps
   (``value.push``); only the chunks holding them are re-optimised. Until 2026-12-04
   the whole step's edits were pushed (and generality misses climbed it too): on
   seven dense CounterFact compiles that lowered the scores every time
   (BENCHMARKS.md).
7. ``move`` (any miss on an edit, ``method auto`` only): the edits that still
   fail leave their step for a ``retrieval`` step, which changes no weights. With
   ``method X`` in the spec the user's choice is respected and the ladder ends.

Rungs 1–4 reuse the cached target values and cost a solve and a verification
(~20 s for the README demo); 5–7 re-optimise target values (minutes).

The planner is pure: the caller passes a plan, its misses and the names of the rungs
already climbed (:mod:`kmec.pipeline` passes the best attempt so far, so a rung that
made things worse is not built upon).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from kmec.planner.model import Plan, Reason, Step
from kmec.spec import Spec

MIN_LAMBDA_REL = 0.01  # below this the solve ignores the key statistics almost entirely
REALISE_FACTOR = 5.0
WEIGH_FACTOR = 4.0
PROTECT_FACTOR = 4.0
OPTIMISE_STOP = 0.97
BROADEN_FACTOR = 4.0
TARGET_METRICS = frozenset({"efficacy", "generality", "portability", "reversal"})
# the misses more optimisation of the edit prompt's target can answer; a generality miss
# is the scope prompts', which `broaden` weighs instead
OPTIMISE_METRICS = TARGET_METRICS - {"generality"}


class Miss(BaseModel):
    """One failing check of one claim on one edit (``score < threshold``); the verifier's
    capability canaries miss as metric ``capability`` on no edit (``edit == ""``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    claim: str
    edit: str
    score: float
    threshold: float

    def describe(self) -> str:
        where = f" on {self.edit}" if self.edit else ""
        return f"{self.claim}{where} ({self.score:.2f} < {self.threshold:g})"


class Repair(BaseModel):
    """A rung taken: its name, the plan it gives and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rung: str
    plan: Plan
    because: str
    costly: bool = False


def _trigger(misses: Sequence[Miss], metrics: Collection[str], limit: int = 3) -> str:
    hit = [m for m in misses if m.metric in metrics]
    text = "; ".join(m.describe() for m in hit[:limit])
    return text + (f" and {len(hit) - limit} more" if len(hit) > limit else "")


def _with_reason(step: Step, params: dict[str, Any], choice: str, because: str) -> Step:
    return step.model_copy(update={"params": params,
                                   "reasons": (*step.reasons, Reason(choice=choice,
                                                                     because=because))})


StepChange = Callable[[Step], "tuple[str, Any, str, str] | None"]


def _each_step(plan: Plan, why: str, n: int, change: StepChange, because: str
               ) -> tuple[Plan, str] | None:
    """Apply ``change`` to every step it concerns: ``change(step)`` gives (param, new value,
    the choice shown in the plan, a summary for the log) or None to leave the step."""
    steps, changed = [], []
    for step in plan.steps:
        got = change(step)
        if got is None:
            steps.append(step)
            continue
        param, value, choice, summary = got
        steps.append(_with_reason(step, {**step.params, param: value},
                                  f"repair {n}: {choice}", f"{why}: {because}"))
        changed.append(f"{step.id} {summary}")
    if not changed:
        return None
    return plan.model_copy(update={"steps": tuple(steps)}), ", ".join(changed) + f" because {why}"


def _owners(step: Step) -> set[str]:
    """The spec edits a step carries (``kz~reverse``, ``kz~opening1`` belong to ``kz``)."""
    return {e.name.split("~")[0] for e in step.edits}


def _realise(plan: Plan, misses: Sequence[Miss], n: int) -> tuple[Plan, str] | None:
    why = _trigger(misses, TARGET_METRICS)

    def change(step: Step) -> tuple[str, Any, str, str] | None:
        lam = step.params.get("lambda_rel")
        if not isinstance(lam, (int, float)) or lam <= MIN_LAMBDA_REL:
            return None
        new = max(round(lam / REALISE_FACTOR, 6), MIN_LAMBDA_REL)
        return "lambda_rel", new, f"λ {lam:g} -> {new:g} (realise)", f"λ {lam:g} -> {new:g}"

    return _each_step(plan, why, n, change, "a smaller λ (the weight of the key statistics in "
                      "the solve) lets the update realise more of each edit's target value"
                      ) if why else None


def _weigh(plan: Plan, misses: Sequence[Miss], n: int) -> tuple[Plan, str] | None:
    why = _trigger(misses, TARGET_METRICS)
    failing = sorted({m.edit for m in misses if m.metric in TARGET_METRICS and m.edit})

    def change(step: Step) -> tuple[str, Any, str, str] | None:
        weights = step.params.get("fit_weight")
        here = [e for e in failing if e in _owners(step)]
        if not isinstance(weights, dict) or not here:
            return None
        new = {**weights, **{e: float(weights.get(e, 1.0)) * WEIGH_FACTOR for e in here}}
        shown = ", ".join(f"{e} {new[e]:g}" for e in here)
        return "fit_weight", dict(sorted(new.items())), f"fit weight {shown} (weigh)", \
            f"fit weight {shown}"

    return _each_step(plan, why, n, change, "these edits get more weight than the others in "
                      "the least-squares fit of the solve") if why and failing else None


def _protect(plan: Plan, misses: Sequence[Miss], n: int) -> tuple[Plan, str] | None:
    why = _trigger(misses, {"locality", "capability"})

    def change(step: Step) -> tuple[str, Any, str, str] | None:
        rho = step.params.get("locality_weight")
        if not step.protect or not isinstance(rho, (int, float)) or rho <= 0:
            return None
        new = rho * PROTECT_FACTOR
        return "locality_weight", new, f"ρ {rho:g} -> {new:g} (protect)", f"ρ {rho:g} -> {new:g}"

    return _each_step(plan, why, n, change, "more weight on keeping the declared locality "
                      "set's keys where they were") if why else None


def _broaden(plan: Plan, misses: Sequence[Miss], n: int) -> tuple[Plan, str] | None:
    why = _trigger(misses, {"generality"})
    failing = {m.edit for m in misses if m.metric == "generality" and m.edit}

    def change(step: Step) -> tuple[str, Any, str, str] | None:
        value = step.params.get("value")
        if not isinstance(value, dict) or "steps" not in value:
            return None
        # the step's requests of a failing edit that carry scope prompts (not its
        # inverse edit, whose prompt is a reverse question)
        here = sorted({e.name for e in step.edits
                       if e.scope and not e.inverse and e.name.split("~")[0] in failing})
        if not here:
            return None
        old = value.get("scope_boost") or {}
        boost = {**old, **{e: float(old.get(e, 1.0)) * BROADEN_FACTOR for e in here}}
        shown = ", ".join(f"{e} {boost[e]:g}" for e in here)
        return "value", {**value, "scope_boost": dict(sorted(boost.items()))}, \
            f"scope weight × {shown} (broaden)", f"scope weight × {shown}"

    return _each_step(plan, why, n, change, "the scope prompts of these edits weigh "
                      f"{BROADEN_FACTOR:g}× more in their target values"
                      ) if why and failing else None


def _optimise(plan: Plan, misses: Sequence[Miss], n: int) -> tuple[Plan, str] | None:
    why = _trigger(misses, OPTIMISE_METRICS)
    failing = {m.edit for m in misses if m.metric in OPTIMISE_METRICS}

    def change(step: Step) -> tuple[str, Any, str, str] | None:
        value = step.params.get("value")
        if not isinstance(value, dict) or "steps" not in value:
            return None
        # the step's requests of a failing edit: its own, an inverse or opening edit of it
        here = sorted({e.name for e in step.edits if e.name.split("~")[0] in failing})
        if not here:
            return None
        old = value.get("push") or {}
        stop = max(float(value.get("stop_prob", 0.0)), OPTIMISE_STOP)
        push = {**old, **{e: max(float(old.get(e, 0.0)), stop) for e in here}}
        shown = ", ".join(here)
        return "value", {**value, "push": dict(sorted(push.items()))}, \
            f"pushed to {stop:g}: {shown} (optimise)", f"push {shown} to {stop:g}"

    return _each_step(plan, why, n, change, "the target values of these edits are optimised "
                      f"to a target probability of {OPTIMISE_STOP:g}, in up to twice the steps"
                      ) if why else None


Rung = Callable[[Plan, Sequence[Miss], int], "tuple[Plan, str] | None"]

RUNGS: tuple[tuple[str, Rung], ...] = (
    ("realise", _realise),
    ("weigh", _weigh),
    ("protect", _protect),
    ("weigh-again", _weigh),
    ("realise-again", _realise),
    ("broaden", _broaden),
    ("optimise", _optimise),
)
COSTLY = frozenset({"broaden", "optimise", "move"})


def costly(rung: str) -> bool:
    """Whether ``rung`` re-optimises target values or runs a new step (slow)."""
    return rung in COSTLY


def next_repair(plan: Plan, misses: Sequence[Miss], climbed: Collection[str], *, spec: Spec,
                move: Callable[[Plan, Sequence[str], int], Plan | None] | None = None,
                skip: Collection[str] = ()) -> Repair | None:
    """The first rung not in ``climbed`` or ``skip`` that changes ``plan`` for ``misses``.

    ``move(plan, edits, n)`` builds the plan with ``edits`` moved to another method (the
    caller plans that step, since it needs the full planner); it is only asked when the
    spec leaves the method to the planner.
    """
    if not misses:
        return None
    n = len(climbed) + 1
    for name, rung in RUNGS:
        if name in climbed or name in skip:
            continue
        got = rung(plan, misses, n)
        if got is not None:
            return Repair(rung=name, plan=got[0], because=got[1], costly=costly(name))
    if "move" in climbed or "move" in skip or move is None or spec.method.method != "auto":
        return None
    edits = tuple(dict.fromkeys(m.edit for m in misses if m.edit))
    if not edits:
        return None
    moved = move(plan, edits, n)
    if moved is None:
        return None
    return Repair(rung="move", plan=moved, costly=True,
                  because=f"{', '.join(edits)} moved to an external memory because "
                  f"{_trigger(misses, {m.metric for m in misses})}")


__all__ = ["COSTLY", "MIN_LAMBDA_REL", "RUNGS", "Miss", "Repair", "costly", "next_repair"]
