"""The workflows: compile a spec into a build directory, verify a build, and their shared start.

Contents:
    Start           a parsed spec, its model loaded, the editors the planner may use
    start()         spec file -> Start (the first steps of compile and bench)
    check_runtime() refuse a bad dtype / device / device map before anything slow runs
    compile_spec()  spec file -> parse -> plan -> execute -> build directory
    compile_loaded()  a Start and its plan -> Compiled (execute, score, repair; nothing written)
    write_compiled()  Compiled -> build directory
    BuildResult     what compile_spec produced
    Inputs          spec, plan, model reference and artifact of one verification
    load_inputs()   read a build directory, or an artifact folder plus a spec file
    verify_build()  load the base model, apply the artifact to a copy, verify, write reports
    default_report_dir()   ``<build>/report``

This is the top of the library's stack: it calls the grammar, the planner,
:func:`kmec.compile.execute`, the artifact formats and the verifier, which
never call each other upward (``tests/test_imports.py``). The CLI and
``kmec.__init__`` call these functions; nothing below imports this module.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from kmec._version import __version__
from kmec.artifacts import MANIFEST, Artifact, apply, copy_for, load_artifact
from kmec.artifacts.build import build_root, read_build, up_to_date, write_build
from kmec.errors import ArtifactError, BackendError, VerifyError
from kmec.grammar.files import find_root
from kmec.hashing import canonical_json, sha256_text, spec_hash
from kmec.models.load import DEFAULT_MODEL, LoadedModel, ModelRef, Runtime, kmec_home, resolve_ref
from kmec.outputs import check_output, ensure_folder
from kmec.planner.model import Plan
from kmec.planner.repair import Miss
from kmec.progress import Progress
from kmec.spec import Spec

if TYPE_CHECKING:
    from kmec.verify.drawstore import DrawStore
    from kmec.verify.report import Report
    from kmec.verify.runner import VerifyMemo

log = logging.getLogger("kmec")


# ---------------------------------------------------------------- the shared start


@dataclass
class Start:
    """A spec with its model loaded: what compile and bench begin with."""

    spec: Spec
    model: str  # the reference as given (--model, the spec's `model`, or the default)
    lm: LoadedModel
    editors: tuple[str, ...]  # models with a trained MEND editor, for the planner


def start(spec_path: str | Path, *, model: str | None = None, root: str | Path | None = None,
          editors: Collection[str] | None = None, limit: int | None = None,
          before_load: Callable[[Spec, ModelRef], None] | None = None,
          progress: Progress | None = None, dtype: str = "float32", device: str | None = None,
          device_map: str | Mapping[str, Any] | None = None) -> Start:
    """Parse ``spec_path`` and load its model.

    Args:
        spec_path: the ``.kmec`` file.
        model: overrides the spec's ``model``.
        root: the folder the spec's includes and subjects files must lie under.
        editors: models with a trained MEND editor; None: the model's own
            editor in ``$KMEC_HOME/editors`` when there is one.
        limit: keep only the first ``limit`` edits.
        before_load: ``fn(spec, ref)`` called after parsing and before the
            (slow) model load, e.g. to check an output path against the inputs.
        progress: ``progress("loading model", 0 or 1, 1)`` around the model load.
        dtype, device, device_map: where and in what precision the model is loaded
            (see :func:`kmec.models.load.load_model`; default: the CPU, float32).

    Raises:
        SpecError / ModelError: the spec or the model (an unknown dtype or device, or a
            device this machine lacks, is refused before the spec is read).
    """
    from kmec.grammar import parse_file
    from kmec.models.load import load_model  # looked up at call time (tests replace it)

    check_runtime(dtype, device, device_map)
    spec = parse_file(spec_path, root=root)
    if limit is not None:
        spec = spec.model_copy(update={"edits": spec.edits[:limit]})
    ref = model or spec.model or DEFAULT_MODEL
    resolved = resolve_ref(ref)
    if before_load is not None:
        before_load(spec, resolved)
    if progress:
        progress("loading model", 0, 1)
    lm = load_model(resolved, dtype=dtype, device=device, device_map=device_map)
    if progress:
        progress("loading model", 1, 1)
    if editors is None:
        from kmec.backends.mend.store import planner_editors

        editors = planner_editors(lm.facts.fingerprint)
    return Start(spec, ref, lm, tuple(editors))


def check_runtime(dtype: str, device: str | None,
                  device_map: str | Mapping[str, Any] | None) -> None:
    """Refuse an unknown dtype or device, a device this machine lacks, or both a device and a
    device map, before anything slow runs (:func:`kmec.models.load.load_model` checks the
    same when it loads).

    Raises:
        ModelError: the message names what is available.
    """
    from kmec.errors import ModelError
    from kmec.models.load import parse_device_map, resolve_device, resolve_dtype

    resolve_dtype(dtype)
    if parse_device_map(device_map) is not None:
        if device is not None:
            raise ModelError("give a device or a device map, not both",
                             hint="a device map places every module itself")
    else:
        resolve_device(device)


# ---------------------------------------------------------------- compile


# seconds of compile, repairs included: the README demo needs 205-255 s on a 2-core CPU whose
# cache holds nothing but the model (statistics and target values 157-190 s, three scorings
# 15-24 + 7-10 + 7-8 s, two re-solves 7-10 s each; 2026-12-02 and a slower 2026-12-03)
DEFAULT_BUDGET_S = 300.0
# a rung that reuses the cached target values costs about this share of an attempt that
# optimised them (README demo: 7.5 s of 105 s)
CHEAP_SHARE = 0.1


@dataclass(frozen=True)
class Attempt:
    """One run of a plan inside :func:`compile_spec` and how the claims scored on it."""

    number: int
    rung: str  # "planned" for the planner's own plan, else the repair rung
    because: str
    plan_hash: str
    seconds: float  # executing the plan
    verify_seconds: float
    checks: int
    failed: tuple[str, ...]  # the verifier's failure lines
    misses: tuple[Miss, ...]
    means: dict[str, float | None]

    @property
    def shortfall(self) -> float:
        return round(sum(m.threshold - m.score for m in self.misses), 6)

    def to_json(self) -> dict[str, object]:
        return {"attempt": self.number, "rung": self.rung, "because": self.because,
                "plan_hash": self.plan_hash, "execute_s": round(self.seconds, 1),
                "verify_s": round(self.verify_seconds, 1), "checks": self.checks,
                "failed": list(self.failed), "means": self.means,
                "misses": [m.model_dump() for m in self.misses]}

    def line(self) -> str:
        state = (f"all {self.checks} checks hold" if not self.failed else
                 f"{len(self.failed)} of {self.checks} checks fail")
        means = ", ".join(f"{k} {v:.3f}" for k, v in self.means.items() if v is not None)
        return (f"attempt {self.number} ({self.rung}, plan {self.plan_hash[:12]}): {state} "
                f"[{means}] in {self.seconds:.1f} s + verify {self.verify_seconds:.1f} s")


@dataclass
class BuildResult:
    """What :func:`compile_spec` produced.

    ``claims_ok`` is None when the claims were not scored (the spec declares none, or
    the budget is 0), else whether every check held on the build that was written
    (the best attempt). ``attempts`` lists every plan that ran, in order; ``verdict``
    says which claims were out of reach and the trade-offs seen when some failed;
    ``report`` is the scoring of the build's attempt (None when nothing was scored).
    """

    out: Path
    plan: Plan
    artifact: Artifact
    seconds: float
    up_to_date: bool
    claims_ok: bool | None = None
    attempts: tuple[Attempt, ...] = ()
    verdict: str = ""
    report: Report | None = None
    runtime: Runtime = field(default_factory=Runtime)  # the device (or device map) and dtype the build ran on


def compile_spec(spec_path: str | Path, *, out: str | Path = "build", model: str | None = None,
                 progress: Progress | None = None, use_cache: bool = True,
                 editors: tuple[str, ...] | None = None, force: bool = False,
                 root: str | Path | None = None, budget: float | None = None,
                 dtype: str = "float32", device: str | None = None,
                 device_map: str | Mapping[str, Any] | None = None) -> BuildResult:
    """Parse, plan and execute a spec, repair what fails its claims; write the build directory.

    When the spec declares claims, the executed plan is scored with the verifier
    (same scoring, same seed as ``kmec verify``); while checks fail and the
    budget allows, the next rung of :mod:`kmec.planner.repair` runs on the best
    attempt so far (fewest failing checks, then the smallest shortfall). The build
    holds the best attempt; ``build/plan.json`` is the plan that made it, with the
    repairs among its steps' reasons; ``compile.log`` and ``repairs.json`` list
    every attempt.

    Args:
        spec_path: the ``.kmec`` file.
        out: the build directory (replaced atomically; an existing path that
            is not a kmec build is refused unless ``force``, see :mod:`kmec.outputs`).
        model: overrides the spec's ``model``.
        progress: ``progress(message, done, total)``.
        use_cache: reuse cached step results and cached target values.
        editors: models with a trained MEND editor, for the planner; None: the
            model's own editor in ``$KMEC_HOME/editors`` when there is one.
        force: replace ``out`` even if kmec did not write it.
        root: the folder the spec's includes and subjects files must lie under
            (default: its repository, see :mod:`kmec.grammar.files`).
        budget: seconds the whole compile may take, repairs included (None: the
            spec's ``budget``, else :data:`DEFAULT_BUDGET_S`; 0: do not score the
            claims). A repair is started only when its estimated time fits.
        dtype, device, device_map: where and in what precision the model runs (see
            :func:`kmec.models.load.load_model`; default: the CPU, float32). The build
            records them (``build.json``'s ``runtime``); a build made on another runtime
            is not up to date.

    Raises:
        OutputError: ``out`` may not be written (checked before anything runs).
        ModelError: an unknown dtype or device, or one this machine lacks.
    """
    from kmec.backends import BACKENDS
    from kmec.planner import plan as make_plan

    t0 = time.perf_counter()
    spec_path = Path(spec_path)
    check_output(out, "build", inputs=[spec_path], force=force)

    def inputs_are_safe(spec: Spec, ref: ModelRef) -> None:
        check_output(out, "build", force=force, inputs=[spec_path, *spec.includes,
                                                       *([ref.path] if ref.path else [])])

    s = start(spec_path, model=model, root=root, editors=editors, before_load=inputs_are_safe,
              progress=progress, dtype=dtype, device=device, device_map=device_map)
    planned = make_plan(s.spec, s.lm.facts, backends=BACKENDS, editors=s.editors)
    out = Path(out)
    if budget is None:
        budget = s.spec.budget if s.spec.budget is not None else DEFAULT_BUDGET_S
    scored = bool(s.spec.claims) and budget > 0
    existing = up_to_date(out, planned, budget=budget if scored else 0.0,
                          runtime=s.lm.runtime.to_json())
    if existing is not None:
        art, info = existing
        final = read_build(out)[0]
        ok = info.get("claims_ok")
        return BuildResult(out, final, art, time.perf_counter() - t0, True,
                           ok if isinstance(ok, bool) else None,
                           verdict=str(info.get("verdict", "")),
                           runtime=Runtime.from_json(info.get("runtime")))
    subjects_root = Path(root) if root is not None else find_root(spec_path)
    c = compile_loaded(s, planned, progress=progress, use_cache=use_cache, budget=budget,
                       root=subjects_root, t0=t0)
    write_compiled(out, c, spec=s.spec, spec_path=spec_path, model=s.model)
    return BuildResult(out, c.plan, c.artifact, c.seconds, False, c.claims_ok, c.attempts,
                       c.verdict, c.report, c.runtime)


@dataclass(frozen=True)
class Compiled:
    """What :func:`compile_loaded` made, before it is written anywhere.

    ``plan`` is the plan that made ``artifact`` (the planner's ``planned`` plan, or
    a repair of it); ``budget`` is 0 when the claims were not scored; ``log`` is
    the text of ``compile.log``.
    """

    planned: Plan
    plan: Plan
    artifact: Artifact
    seconds: float
    budget: float
    claims_ok: bool | None
    attempts: tuple[Attempt, ...]
    verdict: str
    log: str
    report: Report | None = None  # the scoring of the best attempt (None: not scored)
    runtime: Runtime = field(default_factory=Runtime)  # where the model ran (recorded in the build)


def compile_loaded(s: Start, planned: Plan, *, progress: Progress | None = None,
                   use_cache: bool = True, budget: float = 0.0, root: Path | None = None,
                   t0: float | None = None) -> Compiled:
    """Execute ``planned`` on the loaded model; score and repair the claims within ``budget``.

    The middle of :func:`compile_spec`, for callers that hold the model already
    (:func:`kmec.api.edit`). The model is left as it was (checked by fingerprint).

    Args:
        s: the spec and its loaded model.
        planned: the planner's plan for them.
        progress: ``progress(message, done, total)``.
        use_cache: reuse cached step results and target values.
        budget: seconds for the whole compile, repairs included; 0 (or a spec
            without claims): execute the plan once, without scoring.
        root: the folder ``subjects from`` files must lie under (verification).
        t0: when the compile started (``time.perf_counter()``; default: now).

    Raises:
        BackendError: a step failed, or a backend changed the model.
    """
    from kmec.models.load import fingerprint_model

    t0 = time.perf_counter() if t0 is None else t0
    scored = bool(s.spec.claims) and budget > 0
    with _Collect() as messages, tempfile.TemporaryDirectory(prefix="kmec-values-") as scratch:
        values = None if use_cache else Path(scratch)
        loop = _Loop(s, planned, progress, use_cache, values, root or find_root(None), t0,
                     budget)
        if scored:
            loop.run()
            if loop.kept is not None:  # the base side of what `kmec verify` will score
                loop.prime()
                loop.kept.save()
        else:
            loop.once()
    if fingerprint_model(s.lm.model) != s.lm.loaded_fingerprint:
        raise BackendError("the model changed while compiling (a backend mutated it)",
                           step_id="compile")
    seconds = time.perf_counter() - t0
    plan, artifact = loop.best_plan, loop.best_artifact
    verdict = loop.verdict()
    return Compiled(planned, plan, artifact, seconds, budget if scored else 0.0, loop.claims_ok,
                    tuple(loop.attempts), verdict,
                    _compile_log(plan, artifact, seconds, messages.lines, loop.attempts, verdict,
                                 s.lm.runtime),
                    loop.best_report, s.lm.runtime)


def write_compiled(out: str | Path, c: Compiled, *, spec: Spec, spec_path: str | Path,
                   model: str) -> Path:
    """Write what :func:`compile_loaded` made as a build directory (atomically; the
    caller checked ``out`` may be written, see :mod:`kmec.outputs`)."""
    return write_build(out, plan=c.plan, spec=spec, artifact=c.artifact, spec_path=spec_path,
                       model=model, log=c.log, planned=c.planned, budget=c.budget,
                       claims_ok=c.claims_ok, verdict=c.verdict,
                       repairs=[a.to_json() for a in c.attempts], runtime=c.runtime.to_json())


def _capability_miss(report: Report) -> tuple[Miss, ...]:
    cap = report.capability
    if not cap.ran or cap.ok:
        return ()
    score = cap.questions_survived if cap.questions_survived is not None else 0.0
    return (Miss(metric="capability", claim="capability canaries", edit="",
                 score=score, threshold=cap.questions_threshold or 0.0),)


def _what_runs(plan: Plan) -> str:
    """A plan's hash without its reasons (and costs): two repairs that reach the same
    steps and parameters by different rungs run the same plan."""
    steps = [s.model_dump(mode="json", exclude={"reasons", "cost"}) for s in plan.steps]
    return sha256_text(canonical_json(steps))


class _Loop:
    """Execute, score, repair: the attempts of one compile and the best of them."""

    def __init__(self, s: Start, planned: Plan, progress: Progress | None, use_cache: bool,
                 values: Path | None, subjects_root: Path, t0: float, budget: float) -> None:
        self.s, self.planned, self.progress = s, planned, progress
        self.use_cache, self.values, self.root = use_cache, values, subjects_root
        self.t0, self.budget = t0, budget
        self.attempts: list[Attempt] = []
        self.plans: dict[int, Plan] = {}  # attempt number -> the plan it ran
        self.best: tuple[Attempt, Plan, Artifact] | None = None
        self.best_report: Report | None = None  # the scoring of the best attempt
        self.claims_ok: bool | None = None
        self.stopped = ""
        self.memo: VerifyMemo | None = None  # the base side of the scoring, shared
        self.kept: _KeptMemo | None = None  # the memo's copy on disk (with the cache)

    @property
    def best_plan(self) -> Plan:
        assert self.best is not None
        return self.best[1]

    @property
    def best_artifact(self) -> Artifact:
        assert self.best is not None
        return self.best[2]

    def _execute(self, plan: Plan) -> tuple[Artifact, float]:
        from kmec.compile import execute

        t = time.perf_counter()
        artifact = execute(plan, self.s.lm, progress=self.progress, use_cache=self.use_cache,
                           values_dir=self.values)
        return artifact, time.perf_counter() - t

    def once(self) -> None:
        artifact, _ = self._execute(self.planned)
        self.best = (Attempt(1, "planned", "", self.planned.sha256, 0.0, 0.0, 0, (), (), {}),
                     self.planned, artifact)

    def _score(self, plan: Plan, artifact: Artifact) -> Report:
        from kmec.verify import verify
        from kmec.verify.runner import VerifyMemo

        if self.memo is None:
            if self.use_cache:
                self.kept = _KeptMemo(self.s.lm, self.s.spec)
                self.memo = self.kept.memo
            else:
                self.memo = VerifyMemo()
        lm = self.s.lm
        # shares the parameters the artifact does not write; a write to one of them would
        # move the base model too, which the fingerprint check after the loop refuses
        edited = copy_for(lm.model, artifact)
        apply(artifact, edited, fingerprint=lm.facts.fingerprint, tok=lm.tok)
        try:
            return verify(self.s.spec, plan, lm.model, edited, lm.tok, seed=None, root=self.root,
                          artifact=artifact, memo=self.memo, heldout_draw="compile",
                          report_heldout=False, progress=self.progress)
        finally:
            del edited

    def prime(self) -> None:
        """Score on the base model what ``kmec verify`` of the best build will score and
        this loop did not (its held-out variants, drawn with verify's seed): the base
        model only, after the last attempt, so no edit is shaped by them."""
        from kmec.verify.runner import prime_base

        assert self.memo is not None
        t = time.perf_counter()
        n = prime_base(self.s.spec, self.best_plan, self.s.lm.model, self.s.lm.tok, self.memo,
                       root=self.root, progress=self.progress)
        if n:
            log.info("scored %d prompts on the base model for kmec verify (%.1f s)", n,
                     time.perf_counter() - t)

    def run(self) -> None:
        from kmec.planner.repair import costly, next_repair

        plan, rung, because = self.planned, "planned", "the planner's choices"
        climbed: list[str] = []
        while True:
            artifact, took = self._execute(plan)
            if self.progress:
                self.progress("verifying the claims", 0, 1)
            tv = time.perf_counter()
            report = self._score(plan, artifact)
            scored_s = time.perf_counter() - tv
            if self.progress:
                self.progress("verifying the claims", 1, 1)
            misses = tuple(Miss(metric=r.metric, claim=r.claim, edit=r.edit, score=r.score,
                                threshold=r.threshold) for r in report.claims
                           if r.status == "fail" and r.score is not None
                           and r.threshold is not None) + _capability_miss(report)
            checks = sum(r.status != "n/a" for r in report.claims) + report.audit.ran \
                + report.capability.ran
            attempt = Attempt(len(self.attempts) + 1, rung, because, plan.sha256, took, scored_s,
                              checks, tuple(report.failed), misses,
                              {k: v for k, v in report.aggregate.means.items()})
            self.attempts.append(attempt)
            self.plans[attempt.number] = plan
            log.info("%s", attempt.line())
            if self.best is None or (len(attempt.failed), attempt.shortfall) < \
                    (len(self.best[0].failed), self.best[0].shortfall):
                self.best, self.best_report = (attempt, plan, artifact), report
            if report.ok:
                self.claims_ok = True
                return
            self.claims_ok = False
            # the next rung changes the best attempt so far, not the last one: a rung that
            # made things worse is not built upon (on the dense CounterFact batches
            # `realise-again` often did, and the costly rungs after it inherited its λ)
            assert self.best is not None
            base, base_plan = self.best[0], self.best[1]
            if not base.misses:
                self.stopped = "the failing checks (audit, capability) have no repair"
                return
            ran = {_what_runs(p): n for n, p in self.plans.items()}
            skip: list[str] = []
            while True:
                repair = next_repair(base_plan, base.misses, climbed, spec=self.s.spec,
                                     move=self._move, skip=skip)
                if repair is None:
                    if not self.stopped:
                        self.stopped = "no repair is left on the ladder for these misses"
                    return
                if _what_runs(repair.plan) in ran:  # e.g. `realise-again` after an undone `realise`
                    log.info("repair %s skipped: it gives the plan of attempt %d", repair.rung,
                             ran[_what_runs(repair.plan)])
                    climbed.append(repair.rung)
                    continue
                # a costly rung re-optimises target values: the planner's estimate of the
                # changed plan (the first attempt may have reused cached values)
                planned_s = sum(st.cost.seconds for st in repair.plan.steps)
                cheap = took if rung != "planned" and not costly(rung) else CHEAP_SHARE * took
                estimate = (max(self.attempts[0].seconds, took, planned_s) if repair.costly
                            else cheap) + scored_s
                left = self.budget - (time.perf_counter() - self.t0)
                if estimate <= left:
                    break
                self.stopped = (f"the budget ({self.budget:g} s) left {max(left, 0):.0f} s, "
                                f"too little for repair {repair.rung} (~{estimate:.0f} s); "
                                "raise it with --budget or `budget` in the spec")
                log.info("repair %s skipped: %s", repair.rung, self.stopped)
                skip.append(repair.rung)
            climbed.append(repair.rung)
            log.info("repair %d (%s): %s", len(climbed), repair.rung, repair.because)
            plan, rung, because = repair.plan, repair.rung, repair.because

    def _move(self, plan: Plan, edits: Sequence[str], n: int) -> Plan | None:
        """``plan`` with ``edits`` (and their inverse edits) taken out of their steps and
        planned again as one ``retrieval`` step after them (None: nothing to move)."""
        from kmec.backends import BACKENDS
        from kmec.errors import PlanError
        from kmec.planner import plan as make_plan
        from kmec.planner.model import Reason

        spec = self.s.spec
        names = set(edits)
        chosen = [e for e in spec.edits if e.name in names]
        if not chosen or "retrieval" not in BACKENDS:
            return None
        sub = spec.model_copy(update={"edits": tuple(chosen), "method": spec.method.model_copy(
            update={"method": "retrieval", "layers": None, "max_delta": None})})
        try:
            moved = make_plan(sub, self.s.lm.facts, backends=BACKENDS, editors=self.s.editors)
        except PlanError as e:
            log.info("repair move: retrieval cannot take %s (%s)", ", ".join(edits), e.message)
            return None
        because = (f"repair {n}: these edits still failed their claims after the repairs "
                   "above; `method auto` lets an external memory hold them")
        steps = []
        for step in plan.steps:
            kept = tuple(e for e in step.edits if e.name.split("~")[0] not in names)
            if not kept:
                continue
            if len(kept) < len(step.edits):
                step = step.model_copy(update={"edits": kept, "reasons": (*step.reasons, Reason(
                    choice=f"repair {n}: {len(step.edits) - len(kept)} edit(s) moved to "
                    "retrieval (move)", because=because))})
            steps.append(step)
        for i, step in enumerate(moved.steps):
            steps.append(step.model_copy(update={
                "id": f"s{len(steps) + 1:02d}-repair-{step.backend}",
                "reasons": (*step.reasons, Reason(choice=f"repair {n}: move "
                                                  f"{', '.join(edits)}", because=because))}))
        return plan.model_copy(update={"steps": tuple(steps)})

    def verdict(self) -> str:
        """What a failing compile tells the user: the claims out of reach, the best scores
        reached and the trade-offs seen (empty when the claims hold or were not scored)."""
        if self.claims_ok is not False or self.best is None:
            return ""
        best = self.best[0]
        lines = [f"the claims do not all hold after {len(self.attempts)} attempt(s); the build "
                 f"holds attempt {best.number} ({best.rung}): {len(best.failed)} of "
                 f"{best.checks} checks fail"]
        by_claim: dict[str, list[Miss]] = {}
        for m in best.misses:
            by_claim.setdefault(m.claim, []).append(m)
        for claim, ms in by_claim.items():
            worst = min(ms, key=lambda m: m.score)
            where = f" on {len(ms)} edit(s), e.g. {worst.edit}" if worst.edit else ""
            # "out of reach" only when the ladder ran out; a budget stop leaves rungs untried
            label = "not met" if self.stopped.startswith("the budget") else "out of reach"
            text = f"{label}: {claim}{where} {worst.score:.2f} < {worst.threshold:g}"
            held = next((a for a in self.attempts if a.number != best.number
                         and not any(m.claim == claim for m in a.misses)), None)
            if held is not None:  # the trade-off: what failed when this claim held
                cost = ", ".join(_mean_of(held, c) for c in dict.fromkeys(
                    m.claim for m in held.misses)) or "nothing"
                text += (f"; it held in attempt {held.number} ({held.rung}), where "
                         f"{cost} failed instead")
            lines.append(text)
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        return "\n".join(lines)


def _mean_of(attempt: Attempt, claim: str) -> str:
    """``claim`` with its mean score in ``attempt`` when the verifier gave one."""
    mean = attempt.means.get(claim)
    return claim if mean is None else f"{claim} (mean {mean:.2f})"


class _Collect(logging.Handler):
    """The kmec logger's messages while compiling, for compile.log.

    It records what the logger lets through at its configured level (INFO
    under the CLI, WARNING in a program that did not configure logging); it
    never changes a level, so it cannot make a program chattier.
    """

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")

    def __enter__(self) -> Self:
        log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self)


def _compile_log(plan: Plan, artifact: Artifact, seconds: float,
                 messages: Sequence[str] = (), attempts: Sequence[Attempt] = (),
                 verdict: str = "", runtime: Runtime | None = None) -> str:
    lines = [f"kmec {__version__} compiled plan {plan.sha256[:16]} for {plan.model} "
             f"({plan.model_fingerprint[:12]}) in {seconds:.1f} s",
             f"runtime: {(runtime or Runtime()).describe()}"]
    if attempts and attempts[0].checks:
        lines.append(f"{len(attempts)} attempt(s); the build holds plan {plan.sha256[:16]}")
        for a in attempts:
            lines.append(a.line())
            if a.rung != "planned":
                lines.append(f"  repair {a.rung}: {a.because}")
            lines += [f"  fails: {f}" for f in a.failed]
        lines += [f"verdict: {v}" for v in verdict.splitlines()]
    for step in plan.steps:
        lines.append(f"step {step.id}: {step.backend}, {len(step.edits)} edits, layers "
                     f"{list(step.layers)}")
        lines += [f"  because {r.choice}: {r.because}" for r in step.reasons]
    for e in artifact.manifest.payloads:
        lines.append(f"payload {e.id}: {e.kind} on {e.param or e.site} rank {e.rank} "
                     f"sha256 {min(e.tensors.values())[:16]}")
    lines += [f"log {m}" for m in messages]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- verify


@dataclass(frozen=True)
class Inputs:
    """Everything one verification reads."""

    spec: Spec
    plan: Plan | None
    model: str
    artifact: Artifact
    root: Path  # the build directory (or the artifact folder)
    notes: tuple[str, ...] = ()
    runtime: Runtime | None = None  # where the build was compiled (None: a bare artifact)


def _parse(spec_path: Path, root: str | Path | None) -> Spec:
    from kmec.grammar import parse_file

    return parse_file(spec_path, root=root)


def load_inputs(target: str | Path, spec_path: str | Path | None = None, *,
                spec_root: str | Path | None = None) -> Inputs:
    """Read a build directory, or an artifact folder plus a spec file.

    Raises:
        VerifyError: not a build directory / artifact, or an artifact without a spec.
        SpecError: the spec file does not parse.
        ArtifactError: the artifact is corrupt, or disagrees with its plan.
    """
    given = Path(target)
    if not given.exists():
        raise VerifyError(f"{given} does not exist", hint="run kmec compile SPEC first, or pass "
                          "the build directory it wrote")
    root = build_root(given)
    notes: list[str] = []
    if (root / "plan.json").exists():
        plan, spec, info, artifact = read_build(root)
        source = info.get("spec_path")
        if spec_path is not None:
            spec = _parse(Path(spec_path), spec_root)
            if spec_hash(spec) != plan.spec_hash:
                notes.append(f"the spec {spec_path} differs from the one this build was compiled "
                             "from; its claims are checked against the compiled edits")
        elif isinstance(source, str) and source:
            _refuse_stale(source, plan, root, spec_root)
            spec = spec.model_copy(update={"source": source})
        model = info.get("model") if isinstance(info.get("model"), str) else None
        return Inputs(spec, plan, model or plan.model, artifact, root, tuple(notes),
                      Runtime.from_json(info.get("runtime")))
    if (root / MANIFEST).exists():
        if spec_path is None:
            raise VerifyError(f"{root} is an artifact without a build directory around it",
                              hint="pass the spec it was compiled from: kmec verify ARTIFACT --spec SPEC")
        artifact = load_artifact(root)
        spec = _parse(Path(spec_path), spec_root)
        return Inputs(spec, None, artifact.manifest.base_model, artifact, root,
                      ("verified against the spec: no plan was found next to the artifact",))
    raise VerifyError(f"{root} is neither a kmec build directory nor an artifact",
                      hint="pass the folder kmec compile wrote (it holds plan.json)")


def _refuse_stale(source: str, plan: Plan, build: Path, root: str | Path | None) -> None:
    """Refuse to verify a build whose spec file changed since it was compiled.

    The spec file the build records is parsed again (under the same reading rules as
    any spec); a spec that now means something else (another ``spec_hash``: a comment
    or layout change does not count) or no longer parses makes the build stale. A spec
    file that is gone is not an error: the build's own ``spec.json`` is verified.

    Raises:
        VerifyError: the build is stale (exit code 2).
    """
    from kmec.errors import SpecError
    from kmec.grammar import parse_file

    path = Path(source)
    if not source.endswith(".kmec") or not path.is_file():
        return
    try:
        now = spec_hash(parse_file(path, root=root))
    except SpecError:
        now = None
    if now == plan.spec_hash:
        return
    what = "no longer parses" if now is None else "changed"
    raise VerifyError(
        f"the spec {source} {what} since {build} was compiled from it (plan spec hash "
        f"{plan.spec_hash[:12]}{'' if now is None else f', the file now {now[:12]}'})",
        hint=f"recompile it (kmec compile {source} -o {build}), or verify this build against "
        f"the spec it was compiled from with --spec FILE")


def draw_store() -> DrawStore:
    """The drawn neighbourhoods kept under ``$KMEC_HOME/verify/draws``."""
    from kmec.verify.drawstore import DrawStore

    return DrawStore(kmec_home() / "verify" / "draws")


# kmec verify --dtype bfloat16 / float16: a quick look, not the verdict of record (on the
# README demo the capability canary failed in bf16 and held in float32; docs/models.md)
LOW_PRECISION_NOTE = ("verified with {dtype} weights: the edit is added to rounded weights, "
                      "so scores can differ from the float32 model the artifact delivers; "
                      "verify in float32 (the default) for the verdict of record")


class _KeptMemo:
    """A :class:`VerifyMemo` read from and written back to ``$KMEC_HOME/verify``: the
    base model's scores compile computed, for ``kmec verify`` (:mod:`kmec.verify.memostore`),
    and the drawn neighbourhoods (:mod:`kmec.verify.drawstore`)."""

    def __init__(self, lm: LoadedModel, spec: Spec) -> None:
        from kmec.verify.memostore import load_memo, memo_key
        from kmec.verify.runner import VerifyMemo

        self.root = kmec_home() / "verify" / "base"
        self.key = memo_key(fingerprint=lm.facts.fingerprint, runtime=lm.runtime.to_json(),
                            spec_sha=spec_hash(spec))
        self.memo = load_memo(self.root, self.key) or VerifyMemo()
        self.memo.draws = draw_store()
        self._size = self._measure()
        self.loaded = self._size[0]  # base scores read from the disk

    def note(self) -> tuple[str, ...]:
        """The report's note when the base side came from the cache (auditors: --no-cache)."""
        if not self.loaded:
            return ()
        return (f"the base model's scores of up to {self.loaded} prompts were read from "
                f"compile's cache ({self.root.parent}); `kmec verify --no-cache` recomputes "
                "them",)

    def _measure(self) -> tuple[int, bool, int]:
        m = self.memo
        return len(m.base.scores), m.base_ppl is not None, len(m.base_greedy)

    def save(self) -> None:
        """Write the memo back when this run added to it."""
        from kmec.verify.memostore import save_memo

        if self._measure() != self._size:
            save_memo(self.root, self.key, self.memo)
            self._size = self._measure()


def verify_build(build_dir: str | Path, *, spec_path: str | Path | None = None,
                 max_examples: int | None = None, report_dir: str | Path | None = None,
                 db_dir: str | Path | None = None, progress: Progress | None = None,
                 force: bool = False, root: str | Path | None = None, dtype: str = "float32",
                 device: str | None = None,
                 device_map: str | Mapping[str, Any] | None = None,
                 use_cache: bool = True) -> Report:
    """Verify a build directory (or an artifact folder with ``spec_path``).

    Args:
        build_dir: what ``kmec compile`` wrote, or an artifact folder.
        spec_path: a spec file to take the claims from (required for a bare artifact).
        max_examples: hypothesis examples per locality property.
        report_dir: write report.json / junit.xml / report.md / report.html here
            (checked and created before anything is verified; see :mod:`kmec.outputs`).
        db_dir: hypothesis example database (default ``<build>/.hypothesis``).
        progress: ``progress(stage, done, total)``.
        force: write into ``report_dir`` even if it holds files kmec did not write.
        root: the folder the spec's subjects files must lie under (default:
            the spec's repository, see :mod:`kmec.grammar.files`).
        dtype, device, device_map: where and in what precision the base model is loaded
            for verification (default: the CPU, float32), whatever the build was
            compiled on; the payloads are added in the loaded weights' dtype. When the
            two differ, the report's notes say both.
        use_cache: read what compile (or an earlier verification) kept in
            ``$KMEC_HOME/verify`` instead of computing it again: the drawn neighbourhoods
            (seeded, so the same prompts) and the base model's scores, perplexity and
            greedy text for the same model, runtime and spec (:mod:`kmec.verify.memostore`;
            the report is the same either way). False computes everything here.

    Returns:
        The :class:`kmec.verify.Report`.

    Raises:
        KmecError: bad inputs (exit code 2); claim violations are in the report.
    """
    from kmec.models.load import load_model  # looked up at call time (tests replace it)
    from kmec.verify import verify
    from kmec.verify.render import write_reports

    check_runtime(dtype, device, device_map)
    inputs = load_inputs(build_dir, spec_path, spec_root=root)
    if report_dir is not None:  # before the minutes of verification, not after
        given = [build_dir, *([spec_path] if spec_path is not None else [])]
        check_output(report_dir, "report", inputs=given, force=force, flag="--report-dir")
        ensure_folder(report_dir, "report")
    if progress:
        progress("loading model", 0, 1)
    lm = load_model(inputs.model, dtype=dtype, device=device, device_map=device_map)
    fp = lm.facts.fingerprint
    if fp != inputs.artifact.manifest.base_fingerprint:
        raise ArtifactError(
            f"the artifact was compiled for a model with fingerprint "
            f"{inputs.artifact.manifest.base_fingerprint[:12]}, but {inputs.model!r} now has {fp[:12]}",
            hint="recompile the spec for the installed model")
    # a whole copy, not copy_for: the audit compares the two models' weights, and a write
    # to a shared tensor (a broken apply, a tampered artifact runtime) would move both
    edited = copy.deepcopy(lm.model)
    apply(inputs.artifact, edited, fingerprint=fp, tok=lm.tok)
    if progress:
        progress("loading model", 1, 1)
    subjects_root = root if root is not None else _subjects_root(spec_path, inputs)
    kept = _KeptMemo(lm, inputs.spec) if use_cache else None
    report = verify(inputs.spec, inputs.plan, lm.model, edited, lm.tok, seed=None,
                    max_examples=max_examples, root=subjects_root,
                    db_dir=db_dir if db_dir is not None else _default_db(inputs.root),
                    progress=progress, artifact=inputs.artifact,
                    memo=kept.memo if kept is not None else None)
    if kept is not None:
        kept.save()
    notes = inputs.notes + (kept.note() if kept is not None else ())
    if inputs.runtime is not None and inputs.runtime != lm.runtime:
        notes += (f"compiled on {inputs.runtime.describe()}; verified on "
                  f"{lm.runtime.describe()}",)
    if lm.runtime.dtype != "float32":
        notes += (LOW_PRECISION_NOTE.format(dtype=lm.runtime.dtype),)
    if notes:
        report = report.model_copy(update={"notes": report.notes + notes})
    if report_dir is not None:
        write_reports(report, report_dir)
    return report


def _subjects_root(spec_path: str | Path | None, inputs: Inputs) -> Path:
    """Where verification may read ``subjects from`` files (no ``--root`` given): the
    repository of ``--spec``; else of the spec file the build was compiled from, when that
    file is still there as a regular ``.kmec`` file (the stale check has just read it);
    else of the build folder. A build's own record alone never widens the root."""
    if spec_path is not None:
        return find_root(spec_path)
    source = inputs.spec.source
    if source and source.endswith(".kmec") and Path(source).is_file() \
            and not Path(source).is_symlink():
        return find_root(source)
    return find_root(inputs.root)


def _default_db(root: Path) -> Path | None:
    """``<build>/.hypothesis``, unless something other than a folder kmec made is there (a
    link could make the example database write elsewhere): then no database."""
    db = root / ".hypothesis"
    if db.is_symlink() or (db.exists() and not db.is_dir()):
        log.warning("not using %s as the example database: it is not a plain folder", db)
        return None
    return db


def default_report_dir(target: str | Path) -> Path:
    """``<build>/report`` (or ``<artifact>/../report`` for an artifact in a build)."""
    return build_root(target) / "report"


__all__ = ["DEFAULT_BUDGET_S", "Attempt", "BuildResult", "Compiled", "Inputs", "Start",
           "check_runtime", "compile_loaded",
           "compile_spec", "default_report_dir", "draw_store", "load_inputs", "start", "verify_build",
           "write_compiled"]
