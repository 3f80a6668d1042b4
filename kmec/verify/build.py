"""``verify_build``: verify what ``kmec compile`` wrote (or a bare artifact).

Contents:
    Inputs          spec, plan, model reference, artifact and folders of one verification
    load_inputs()   read a build directory or an artifact folder (+ a spec file)
    verify_build()  load the base model, apply the artifact to a copy, verify, write reports

A build directory holds ``plan.json``, ``spec.json``, ``build.json`` and
``artifact/``; the example database goes to ``<build>/.hypothesis`` and the
reports to ``<build>/report`` by default. An artifact folder on its own
needs ``--spec``: its edits are then rendered from the spec (no plan).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from kmec.artifacts import MANIFEST, Artifact, apply, load_artifact
from kmec.errors import ArtifactError, VerifyError
from kmec.grammar.files import find_root
from kmec.outputs import check_output, ensure_folder
from kmec.planner.draft import spec_hash
from kmec.planner.model import Plan
from kmec.spec import Spec
from kmec.verify.render import write_reports
from kmec.verify.report import Report
from kmec.verify.runner import Progress, verify

log = logging.getLogger("kmec")


@dataclass(frozen=True)
class Inputs:
    """Everything one verification reads."""

    spec: Spec
    plan: Plan | None
    model: str
    artifact: Artifact
    root: Path  # the build directory (or the artifact folder)
    notes: tuple[str, ...] = ()


def _parse(spec_path: Path, root: str | Path | None) -> Spec:
    from kmec.grammar import parse_file

    return parse_file(spec_path, root=root)


def load_inputs(target: str | Path, spec_path: str | Path | None = None, *,
                spec_root: str | Path | None = None) -> Inputs:
    """Read a build directory, or an artifact folder plus a spec file.

    Raises:
        VerifyError: not a build directory / artifact, or an artifact without a spec.
        SpecError: the spec file does not parse.
        ArtifactError: the artifact is corrupt.
    """
    root = Path(target)
    if not root.exists():
        raise VerifyError(f"{root} does not exist", hint="run kmec compile SPEC first, or pass "
                          "the build directory it wrote")
    if (root / MANIFEST).exists() and (root.parent / "plan.json").exists():
        root = root.parent  # the artifact folder inside a build directory
    notes: list[str] = []
    if (root / "plan.json").exists():
        from kmec.compile import read_build

        plan, spec, info, artifact = read_build(root)
        source = info.get("spec_path")
        if spec_path is not None:
            spec = _parse(Path(spec_path), spec_root)
            if spec_hash(spec) != plan.spec_hash:
                notes.append(f"the spec {spec_path} differs from the one this build was compiled "
                             "from; its claims are checked against the compiled edits")
        elif source:
            spec = spec.model_copy(update={"source": source})
        return Inputs(spec, plan, info.get("model") or plan.model, artifact, root, tuple(notes))
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


def verify_build(build_dir: str | Path, *, spec_path: str | Path | None = None,
                 max_examples: int | None = None, report_dir: str | Path | None = None,
                 db_dir: str | Path | None = None, progress: Progress | None = None,
                 force: bool = False, root: str | Path | None = None) -> Report:
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

    Raises:
        KmecError: bad inputs (exit code 2); claim violations are in the report.
    """
    from kmec.models.load import load_model

    inputs = load_inputs(build_dir, spec_path, spec_root=root)
    if report_dir is not None:  # before the minutes of verification, not after
        given = [build_dir, *([spec_path] if spec_path is not None else [])]
        check_output(report_dir, "report", inputs=given, force=force, flag="--report-dir")
        ensure_folder(report_dir, "report")
    if progress:
        progress("loading model", 0, 1)
    lm = load_model(inputs.model)
    fp = lm.facts.fingerprint
    if fp != inputs.artifact.manifest.base_fingerprint:
        raise ArtifactError(
            f"the artifact was compiled for a model with fingerprint "
            f"{inputs.artifact.manifest.base_fingerprint[:12]}, but {inputs.model!r} now has {fp[:12]}",
            hint="recompile the spec for the installed model")
    edited = copy.deepcopy(lm.model)
    apply(inputs.artifact, edited, fingerprint=fp, tok=lm.tok)
    if progress:
        progress("loading model", 1, 1)
    # subjects files are confined to --root, else to the repository of the spec given
    # (--spec) or of the build folder: never to a root a build's own files could name
    subjects_root = root if root is not None else find_root(spec_path or inputs.root)
    report = verify(inputs.spec, inputs.plan, lm.model, edited, lm.tok, seed=None,
                    max_examples=max_examples, root=subjects_root,
                    db_dir=db_dir if db_dir is not None else _default_db(inputs.root),
                    progress=progress, artifact=inputs.artifact)
    if inputs.notes:
        report = report.model_copy(update={"notes": report.notes + inputs.notes})
    if report_dir is not None:
        write_reports(report, report_dir)
    return report


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
    root = Path(target)
    if (root / MANIFEST).exists() and (root.parent / "plan.json").exists():
        root = root.parent
    return root / "report"


__all__ = ["Inputs", "default_report_dir", "load_inputs", "verify_build"]
