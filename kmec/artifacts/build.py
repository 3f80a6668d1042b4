"""The build directory: what ``kmec compile`` writes and ``kmec verify`` / ``apply`` read.

Contents:
    PLAN / SPEC / INFO / ARTIFACT / LOG   the file names of a build directory
    write_build()    plan, spec, artifact, provenance and log -> a build directory (atomic)
    up_to_date()     the artifact and info of an existing build planned the same way, or None
    build_runtime()  the device, dtype and device map a build.json records
    read_build()     (plan, spec, build info, artifact), every part checked against the others
    load_checked()   the artifact of a build (checked against its plan) or of a bare folder

A build directory::

    build/plan.json        the plan (canonical JSON; its sha256 is the plan hash)
    build/spec.json        the parsed spec (includes merged, without spans)
    build/build.json       spec path, model reference, plan hash, artifact sha256, kmec version,
                           runtime (the device or device map and dtype the model ran in)
    build/artifact/        manifest.json + payloads.safetensors
    build/compile.log      what was done and why (the pipeline writes it)
    build/repairs.json     every attempt of the compile-verify-repair loop (when claims were scored)
    build/.kmec-output     the marker that lets a later compile replace this folder

It is written atomically (a reader sees the old build or the new one) and
read back only when every part agrees: the artifact with its own manifest and
with ``plan.json`` (:func:`~kmec.artifacts.format.check_against_plan`),
``build.json`` with both, ``spec.json`` with the plan's ``spec_hash``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kmec._version import __version__
from kmec.artifacts.format import Artifact, check_against_plan, load_artifact, save_artifact
from kmec.errors import ArtifactError, VerifyError
from kmec.hashing import atomic_dir, canonical_json, spec_hash
from kmec.outputs import write_marker
from kmec.planner.model import Plan
from kmec.spec import Spec

PLAN, SPEC, INFO, ARTIFACT, LOG = "plan.json", "spec.json", "build.json", "artifact", "compile.log"
REPAIRS = "repairs.json"
# what kmec.models.load.Runtime().to_json() gives: the CPU in float32 (tests check they agree)
DEFAULT_RUNTIME: dict[str, Any] = {"device": "cpu", "dtype": "float32", "device_map": None}


def write_build(out: str | Path, *, plan: Plan, spec: Spec, artifact: Artifact,
                spec_path: str | Path, model: str, log: str, planned: Plan | None = None,
                budget: float = 0.0, claims_ok: bool | None = None, verdict: str = "",
                repairs: list[dict[str, Any]] | None = None,
                runtime: dict[str, Any] | None = None) -> Path:
    """Write a build directory atomically (the caller checked ``out`` may be written).

    Args:
        out: the build directory.
        plan, spec, artifact: what was compiled (``plan``: the plan that was executed).
        spec_path: the spec file (recorded resolved, for ``kmec verify``).
        model: the model reference as the user gave it.
        log: the text of ``compile.log``.
        planned: the planner's plan, when repairs changed it (default ``plan``): a
            later compile of the same spec finds this build up to date by its hash.
        budget: the compile's time budget (0: the claims were not scored).
        claims_ok: whether the claims held on this build (None: not scored).
        verdict: what was out of reach, when they did not.
        repairs: the attempts of the repair loop, written to ``repairs.json``.
        runtime: where the model ran, ``{"device", "dtype", "device_map"}``
            (:meth:`kmec.models.load.Runtime.to_json`; None: the CPU in float32).
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_marker(tmp, "build")
        (tmp / PLAN).write_text(plan.to_json())
        (tmp / SPEC).write_text(canonical_json(spec.model_dump(mode="json")))
        (tmp / INFO).write_text(canonical_json({
            "spec_path": str(Path(spec_path).resolve()), "model": model,
            "plan_hash": plan.sha256, "base_fingerprint": plan.model_fingerprint,
            "planned_hash": (planned or plan).sha256, "budget": budget,
            "claims_ok": claims_ok, "verdict": verdict,
            "kmec_version": __version__, "artifact_sha256": artifact.manifest.sha256,
            "runtime": runtime or dict(DEFAULT_RUNTIME)}))
        save_artifact(artifact, tmp / ARTIFACT)
        (tmp / LOG).write_text(log)
        if repairs:
            (tmp / REPAIRS).write_text(canonical_json(repairs))
    return out


def up_to_date(out: str | Path, planned: Plan, *, budget: float = 0.0,
               runtime: dict[str, Any] | None = None) -> tuple[Artifact, dict[str, Any]] | None:
    """The artifact and ``build.json`` of an up-to-date build at ``out`` (None: compile again).

    Up to date: the build was compiled from a plan identical to ``planned`` (the
    planner's plan, before any repair), its files agree with each other, and its
    claims held — or were scored under the same ``budget`` (a larger budget may
    repair what a smaller one could not) — and it ran on the same ``runtime`` (device or
    device map and dtype; None and a build that records none: the CPU in float32). A build whose files were changed (a
    tampered manifest, payloads the plan does not declare, a build.json for another
    plan) is not up to date.
    """
    out = Path(out)
    try:
        text = (out / PLAN).read_text()
        plan = Plan.model_validate_json(text)
        info = json.loads((out / INFO).read_text())
        art = load_artifact(out / ARTIFACT)
        check_against_plan(art.manifest, plan)
    except (OSError, ValueError, ArtifactError):
        return None
    if not isinstance(info, dict) or info.get("plan_hash") != plan.sha256 or \
            info.get("artifact_sha256") != art.manifest.sha256 or plan.to_json() != text:
        return None
    if info.get("planned_hash", info.get("plan_hash")) != planned.sha256:
        return None
    if build_runtime(info) != (runtime or DEFAULT_RUNTIME):
        return None  # the target values differ with the device and the dtype
    if info.get("claims_ok") is not True and info.get("budget", 0.0) != budget:
        return None  # claims that failed, or were not scored, may fare otherwise now
    return art, info


def read_build(build: str | Path) -> tuple[Plan, Spec, dict[str, Any], Artifact]:
    """Load (plan, spec, build info, artifact) from a build directory.

    Raises:
        VerifyError: the directory is not a complete kmec build.
        ArtifactError: a part disagrees with the others (the field named).
    """
    build = Path(build)
    try:
        plan = Plan.model_validate_json((build / PLAN).read_text())
        spec = Spec.model_validate(json.loads((build / SPEC).read_text()))
        info = json.loads((build / INFO).read_text())
    except (OSError, ValueError) as e:
        raise VerifyError(f"{build} is not a complete kmec build directory ({_short(e)})",
                          hint="run kmec compile SPEC --out DIR first") from None
    if not isinstance(info, dict):
        raise VerifyError(f"{build}/{INFO} is not a kmec build record", hint="recompile the spec")
    artifact = load_artifact(build / ARTIFACT)
    check_against_plan(artifact.manifest, plan, where=f"{build}/{ARTIFACT}")
    hint = "recompile the spec; a build is never edited by hand"
    if info.get("plan_hash") != plan.sha256:
        raise ArtifactError(f"{build}/{INFO} records plan {str(info.get('plan_hash'))[:12]}, "
                            f"but plan.json is {plan.sha256[:12]} (field 'plan_hash')", hint=hint)
    if info.get("artifact_sha256") != artifact.manifest.sha256:
        raise ArtifactError(f"{build}/{INFO} does not record this artifact (field "
                            "'artifact_sha256')", hint=hint)
    if spec_hash(spec) != plan.spec_hash:
        raise ArtifactError(f"{build}/{SPEC} is not the spec plan.json was planned from "
                            "(its hash differs from the plan's 'spec_hash')", hint=hint)
    return plan, spec, info, artifact


def build_runtime(info: dict[str, Any]) -> dict[str, Any]:
    """The runtime a ``build.json`` records; a build written before runtimes were recorded
    ran on the CPU in float32.

    >>> build_runtime({}) == DEFAULT_RUNTIME
    True
    """
    runtime = info.get("runtime")
    return runtime if isinstance(runtime, dict) else dict(DEFAULT_RUNTIME)


def build_root(target: str | Path) -> Path:
    """The build directory ``target`` names: itself, or the build around an artifact folder."""
    root = Path(target)
    if (root / "manifest.json").exists() and (root.parent / PLAN).exists():
        return root.parent
    return root


def load_checked(target: str | Path) -> Artifact:
    """The artifact of a build directory (checked against its plan, see :func:`read_build`),
    or of a bare artifact folder (checked against its own manifest).

    Raises:
        ArtifactError / VerifyError: a missing, corrupt or tampered artifact or build.
    """
    root = build_root(target)
    if (root / PLAN).exists():
        return read_build(root)[3]
    return load_artifact(root)


def _short(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
