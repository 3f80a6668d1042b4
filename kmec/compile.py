"""Compilation: run a plan's steps on a model and write the build directory.

Contents:
    execute()        Plan + model -> Artifact (each step wrapped in BackendError)
    stats_for_step() the statistics provider a step asks for (or None)
    compile_spec()   spec file -> parse -> plan -> execute -> build directory
    BuildResult      what compile_spec produced
    read_build()     load plan, spec and artifact back from a build directory

The build directory (written atomically)::

    build/plan.json        the plan (canonical JSON; its sha256 is the plan hash)
    build/spec.json        the parsed spec (includes merged, without spans)
    build/build.json       spec path, model reference, hashes, kmec version
    build/artifact/        manifest.json + payloads.safetensors
    build/compile.log      what was done and why, the payloads, and the messages
                           logged while compiling (timings, cache reuse, warnings)

Steps are cached by content (``$KMEC_HOME/steps/<hash>``: the step, the base
fingerprint, the kmec version and, for ``order sequence``, the steps before
it), so rerunning an unchanged spec in CI recompiles nothing. Inside a step
that must run, the rank-one backends reuse the target values (δ) of edit
chunks optimised before on the same weights (``$KMEC_HOME/backends/values``,
:class:`kmec.backends.values.ValueCache`): changing λ or the layer range, or
adding edits to a spec, re-optimises only what changed. ``use_cache=False``
turns off both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from kmec._version import __version__
from kmec.artifacts import (
    Artifact,
    apply,
    build_artifact,
    check_against_plan,
    load_artifact,
    save_artifact,
)
from kmec.backends import BACKENDS, get_backend
from kmec.backends.base import ExecContext, Payload, StatsProvider
from kmec.errors import ArtifactError, BackendError, KmecError, VerifyError
from kmec.hashing import atomic_dir, canonical_json, sha256_text
from kmec.models.adapters import adapter_for
from kmec.models.load import (
    DEFAULT_MODEL,
    LoadedModel,
    fingerprint_model,
    kmec_home,
    load_model,
    resolve_ref,
)
from kmec.outputs import check_output, write_marker
from kmec.planner.draft import spec_hash
from kmec.planner.model import Plan, Step
from kmec.spec import Spec

log = logging.getLogger("kmec")

Progress = Callable[[str, int, int], None]


def _step_key(step: Step, fingerprint: str, previous: str) -> str:
    return sha256_text(canonical_json({"step": step.model_dump(mode="json"), "base": fingerprint,
                                       "kmec": __version__, "previous": previous}))


def stats_for_step(step: Step, lm: LoadedModel, progress: Progress | None = None
                   ) -> StatsProvider | None:
    """The statistics provider ``step`` asks for (None: it needs none)."""
    if step.needs_stats is None:
        return None
    from kmec.stats import provider

    return provider(lm.model, lm.tok, lm.facts, adapter_for(lm.facts.model_type),
                    step.needs_stats, progress=progress)


def execute(plan: Plan, lm: LoadedModel, *, progress: Progress | None = None,
            use_cache: bool = True) -> Artifact:
    """Run every step of ``plan`` on ``lm`` and return the artifact.

    The model is left exactly as it was (checked with its fingerprint). For
    ``order sequence`` each step sees the earlier steps' edits applied.

    Raises:
        BackendError: a step failed (wrapping the cause) or mutated the model.
    """
    adapter = adapter_for(lm.facts.model_type)
    cache_root = kmec_home() / "steps"
    results: list[tuple[str, list[Payload]]] = []
    applied = []
    previous = ""
    try:
        for step in plan.steps:
            history = previous if plan.order == "sequence" else ""
            key = _step_key(step, lm.facts.fingerprint, history)
            previous = key
            payloads = _cached_step(cache_root / key, step) if use_cache else None
            if payloads is None:
                # the weights this step runs on: the base, or the base plus earlier steps
                weights = sha256_text(f"{lm.facts.fingerprint}+{history}") if history \
                    else lm.facts.fingerprint
                payloads = _run_step(step, lm, adapter, plan.seed, progress,
                                     weights=weights, use_cache=use_cache)
                if use_cache:
                    _store_step(cache_root / key, step, payloads, lm, adapter, plan)
            else:
                log.info("step %s: unchanged, reusing cached result", step.id)
            results.append((step.id, payloads))
            if plan.order == "sequence":
                one = build_artifact([(step.id, payloads)], base_model=plan.model,
                                     base_fingerprint=lm.facts.fingerprint,
                                     base_arch=lm.facts.arch,
                                     weight_layout=adapter.weight_layout, plan_hash=plan.sha256)
                applied.append(apply(one, lm.model, check=False, tok=lm.tok))
    finally:
        for a in reversed(applied):
            a.revert()
    return build_artifact(results, base_model=plan.model, base_fingerprint=lm.facts.fingerprint,
                          base_arch=lm.facts.arch, weight_layout=adapter.weight_layout,
                          plan_hash=plan.sha256)


def _run_step(step: Step, lm: LoadedModel, adapter: Any, seed: int,
              progress: Progress | None, *, weights: str, use_cache: bool) -> list[Payload]:
    backend = get_backend(step.backend)
    t0 = time.perf_counter()
    try:
        stats = stats_for_step(step, lm, progress)
        ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter, facts=lm.facts, stats=stats,
                          cache_dir=kmec_home() / "backends" if use_cache else None,
                          weights=weights, seed=seed, progress=progress)
        payloads = list(backend.execute(step, ctx))
    except KmecError as e:
        if isinstance(e, BackendError):
            raise
        raise BackendError(str(e), step_id=step.id) from e
    except (RuntimeError, ValueError, FloatingPointError) as e:
        raise BackendError(f"{step.backend} failed: {e}", step_id=step.id,
                           hint="rerun with --debug for the traceback") from e
    log.info("step %s (%s, %d edits) took %.1f s", step.id, step.backend, len(step.edits),
             time.perf_counter() - t0)
    return payloads


def _cached_step(path: Path, step: Step) -> list[Payload] | None:
    if not (path / "manifest.json").exists():
        return None
    try:
        art = load_artifact(path)
    except ArtifactError as e:
        log.warning("ignoring a corrupt cached step at %s (%s)", path, e.message)
        return None
    for e in art.manifest.payloads:
        if e.step != step.id or (e.kind != "memory" and e.param not in step.writes):
            log.warning("ignoring a cached step at %s: payload %s is not what step %s declares",
                        path, e.id, step.id)
            return None
    return art.payloads()


def _store_step(path: Path, step: Step, payloads: list[Payload], lm: LoadedModel, adapter: Any,
                plan: Plan) -> None:
    art = build_artifact([(step.id, payloads)], base_model=plan.model,
                         base_fingerprint=lm.facts.fingerprint, base_arch=lm.facts.arch,
                         weight_layout=adapter.weight_layout, plan_hash="step")
    save_artifact(art, path)


@dataclass
class BuildResult:
    """What :func:`compile_spec` produced."""

    out: Path
    plan: Plan
    artifact: Artifact
    seconds: float
    up_to_date: bool


def compile_spec(spec_path: str | Path, *, out: str | Path = "build", model: str | None = None,
                 progress: Progress | None = None, use_cache: bool = True,
                 editors: tuple[str, ...] | None = None, force: bool = False,
                 root: str | Path | None = None) -> BuildResult:
    """Parse, plan and execute a spec; write the build directory.

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

    Raises:
        OutputError: ``out`` may not be written (checked before anything runs).
    """
    from kmec.grammar import parse_file
    from kmec.planner import plan as make_plan

    t0 = time.perf_counter()
    spec_path = Path(spec_path)
    check_output(out, "build", inputs=[spec_path], force=force)
    spec = parse_file(spec_path, root=root)
    ref = model or spec.model or DEFAULT_MODEL
    resolved = resolve_ref(ref)
    check_output(out, "build", force=force, inputs=[spec_path, *spec.includes,
                                                   *([resolved.path] if resolved.path else [])])
    lm = load_model(resolved)
    if editors is None:
        from kmec.backends.mend.store import planner_editors

        editors = planner_editors(lm.facts.fingerprint)
    plan = make_plan(spec, lm.facts, backends=BACKENDS, editors=editors)
    out = Path(out)
    existing = _existing_build(out, plan)
    if existing is not None:
        return BuildResult(out, plan, existing, time.perf_counter() - t0, True)
    before = lm.facts.fingerprint
    with _Collect() as messages:
        artifact = execute(plan, lm, progress=progress, use_cache=use_cache)
    if fingerprint_model(lm.model) != before:
        raise BackendError("the model changed while compiling (a backend mutated it)",
                           step_id="compile")
    seconds = time.perf_counter() - t0
    with atomic_dir(out) as tmp:
        write_marker(tmp, "build")
        (tmp / "plan.json").write_text(plan.to_json())
        (tmp / "spec.json").write_text(canonical_json(spec.model_dump(mode="json")))
        (tmp / "build.json").write_text(canonical_json({
            "spec_path": str(spec_path.resolve()), "model": ref, "plan_hash": plan.sha256,
            "base_fingerprint": lm.facts.fingerprint, "kmec_version": __version__,
            "artifact_sha256": artifact.manifest.sha256}))
        save_artifact(artifact, tmp / "artifact")
        (tmp / "compile.log").write_text(_compile_log(plan, artifact, seconds, messages.lines))
    return BuildResult(out, plan, artifact, seconds, False)


def _existing_build(out: Path, plan: Plan) -> Artifact | None:
    """The artifact of an up-to-date build at ``out`` (None: compile again).

    A build whose files were changed (a tampered manifest, payloads the plan
    does not declare, a build.json for another plan) is not up to date.
    """
    try:
        if (out / "plan.json").read_text() != plan.to_json():
            return None
        info = json.loads((out / "build.json").read_text())
        art = load_artifact(out / "artifact")
        check_against_plan(art.manifest, plan)
    except (OSError, ValueError, ArtifactError):
        return None
    if not isinstance(info, dict) or info.get("plan_hash") != plan.sha256 or \
            info.get("artifact_sha256") != art.manifest.sha256:
        return None
    return art


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
                 messages: Sequence[str] = ()) -> str:
    lines = [f"kmec {__version__} compiled plan {plan.sha256[:16]} for {plan.model} "
             f"({plan.model_fingerprint[:12]}) in {seconds:.1f} s"]
    for step in plan.steps:
        lines.append(f"step {step.id}: {step.backend}, {len(step.edits)} edits, layers "
                     f"{list(step.layers)}")
        lines += [f"  because {r.choice}: {r.because}" for r in step.reasons]
    for e in artifact.manifest.payloads:
        lines.append(f"payload {e.id}: {e.kind} on {e.param or e.site} rank {e.rank} "
                     f"sha256 {min(e.tensors.values())[:16]}")
    lines += [f"log {m}" for m in messages]
    return "\n".join(lines) + "\n"


def read_build(build: str | Path) -> tuple[Plan, Spec, dict[str, Any], Artifact]:
    """Load (plan, spec, build info, artifact) from a build directory.

    Raises:
        VerifyError: the directory is not a complete kmec build.
    """
    build = Path(build)
    try:
        plan = Plan.model_validate_json((build / "plan.json").read_text())
        spec = Spec.model_validate(json.loads((build / "spec.json").read_text()))
        info = json.loads((build / "build.json").read_text())
    except (OSError, ValueError) as e:
        raise VerifyError(f"{build} is not a complete kmec build directory ({_short(e)})",
                          hint="run kmec compile SPEC --out DIR first") from None
    if not isinstance(info, dict):
        raise VerifyError(f"{build}/build.json is not a kmec build record",
                          hint="recompile the spec")
    artifact = load_artifact(build / "artifact")
    check_against_plan(artifact.manifest, plan, where=f"{build}/artifact")
    hint = "recompile the spec; a build is never edited by hand"
    if info.get("plan_hash") != plan.sha256:
        raise ArtifactError(f"{build}/build.json records plan {str(info.get('plan_hash'))[:12]}, "
                            f"but plan.json is {plan.sha256[:12]} (field 'plan_hash')", hint=hint)
    if info.get("artifact_sha256") != artifact.manifest.sha256:
        raise ArtifactError(f"{build}/build.json does not record this artifact (field "
                            "'artifact_sha256')", hint=hint)
    if spec_hash(spec) != plan.spec_hash:
        raise ArtifactError(f"{build}/spec.json is not the spec plan.json was planned from "
                            "(its hash differs from the plan's 'spec_hash')", hint=hint)
    return plan, spec, info, artifact


def load_checked(target: str | Path) -> Artifact:
    """The artifact of a build directory (checked against its plan, see :func:`read_build`),
    or of a bare artifact folder (checked against its own manifest).

    Raises:
        ArtifactError / VerifyError: a missing, corrupt or tampered artifact or build.
    """
    root = Path(target)
    if (root / "manifest.json").exists() and (root.parent / "plan.json").exists():
        root = root.parent  # the artifact folder inside a build directory
    if (root / "plan.json").exists():
        return read_build(root)[3]
    return load_artifact(root)


def _short(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
