"""kmec: a declarative compiler for knowledge edits of language models.

In a notebook, one call edits a model in place (see docs/python.md)::

    e = kmec.edit("smollm2-135m", [kmec.Fact(prompt="The capital of {subject} is",
                                             subject="France", target_new="Lyon")])
    e.generate("The capital of France is"); e.verify(); e.revert(); e.save("build")

Underneath, the library is five verbs over five nouns (see docs/ARCHITECTURE.md)::

    spec = kmec.parse(text, path="capitals.kmec")          # text      -> Spec
    plan = kmec.plan(spec, loaded.facts)                   # Spec      -> Plan
    art = kmec.execute(plan, loaded)                       # Plan      -> Artifact
    handle = kmec.apply(art, model)                        # Artifact  -> edited model (revertible)
    report = kmec.verify(spec, plan, base, edited, tok)    # models    -> Report

``kmec.load_model("smollm2-135m")`` gives the ``loaded`` model these take.
Heavy modules (torch, transformers) are imported only when a verb that needs
them is called, so ``import kmec`` stays cheap; the types named in the
signatures are imported for type checkers only.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kmec._version import __version__
from kmec.api import Edited, Fact, edit, load_model
from kmec.errors import KmecError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from kmec.artifacts import Applied, Artifact
    from kmec.backends.base import Backend
    from kmec.models.facts import ModelFacts
    from kmec.models.load import LoadedModel
    from kmec.pipeline import BuildResult
    from kmec.planner.model import Plan
    from kmec.progress import Progress
    from kmec.spec import Spec
    from kmec.verify.report import Report

__all__ = ["Edited", "Fact", "KmecError", "__version__", "apply", "compile_spec", "edit",
           "execute", "load_model", "parse", "plan", "verify", "verify_build"]


def parse(text: str, *, path: str = "<string>", includes: bool = True) -> Spec:
    """Parse and check spec text (see :func:`kmec.grammar.parse`).

    Raises:
        SpecError: every error found, each with ``file:line:col``.
    """
    from kmec.grammar import parse as _parse

    return _parse(text, path=path, includes=includes)


def plan(spec: Spec, facts: ModelFacts, *, backends: Mapping[str, Backend] | None = None,
         editors: Collection[str] = ()) -> Plan:
    """Compile a Spec into a Plan for a model's facts (see :func:`kmec.planner.plan`).

    Args:
        spec: the parsed spec.
        facts: the model's facts (``kmec.load_model(...).facts``; no weights needed).
        backends: the editing methods the planner may choose (default: all of
            :data:`kmec.backends.BACKENDS`).
        editors: models with a trained MEND editor (fingerprints or names).

    Raises:
        PlanError: the spec cannot be satisfied on this model.
    """
    from kmec.planner import plan as _plan

    if backends is None:
        from kmec.backends import BACKENDS

        backends = BACKENDS
    return _plan(spec, facts, backends=backends, editors=editors)


def execute(plan: Plan, loaded: LoadedModel, *, progress: Progress | None = None,
            use_cache: bool = True) -> Artifact:
    """Run a plan on a loaded model and return the Artifact (see :func:`kmec.compile.execute`).

    The model is left exactly as it was.

    Raises:
        BackendError: a step failed (wrapping the cause) or changed the model.
    """
    from kmec.compile import execute as _execute

    return _execute(plan, loaded, progress=progress, use_cache=use_cache)


def apply(artifact: Artifact, model: torch.nn.Module, *, fingerprint: str | None = None,
          check: bool = True, tok: PreTrainedTokenizerBase | None = None) -> Applied:
    """Apply an Artifact to a model in place; returns a handle whose ``revert()``
    restores the exact weights (see :func:`kmec.artifacts.apply`).

    Raises:
        ArtifactError: the model is not the artifact's base, or a payload is malformed.
    """
    from kmec.artifacts import apply as _apply

    return _apply(artifact, model, fingerprint=fingerprint, check=check, tok=tok)


def verify(spec: Spec, plan: Plan | None, base: torch.nn.Module, edited: torch.nn.Module,
           tok: PreTrainedTokenizerBase, *, seed: int | None = None,
           max_examples: int | None = None, db_dir: str | os.PathLike[str] | None = None,
           progress: Progress | None = None, artifact: Artifact | None = None,
           root: str | os.PathLike[str] | None = None) -> Report:
    """Check a spec's claims on base vs edited models (see :func:`kmec.verify.verify`).

    Neither model is modified. ``report.exit_code`` is 0 when every claim holds.

    Raises:
        VerifyError: nothing to verify, or inputs that do not fit together.
    """
    from kmec.verify import verify as _verify

    return _verify(spec, plan, base, edited, tok, seed=seed, max_examples=max_examples,
                   db_dir=db_dir, progress=progress, artifact=artifact, root=root)


def compile_spec(spec_path: str | os.PathLike[str], *, out: str | os.PathLike[str] = "build",
                 model: str | None = None, progress: Progress | None = None,
                 use_cache: bool = True, editors: tuple[str, ...] | None = None,
                 force: bool = False, root: str | os.PathLike[str] | None = None,
                 budget: float | None = None, dtype: str = "float32", device: str | None = None,
                 device_map: str | Mapping[str, object] | None = None) -> BuildResult:
    """Compile a spec file into a build directory, as ``kmec compile`` does
    (see :func:`kmec.pipeline.compile_spec` for the arguments; ``dtype``, ``device``
    and ``device_map`` as for :func:`kmec.load_model`, recorded in the build)."""
    from kmec.pipeline import compile_spec as _compile

    return _compile(Path(spec_path), out=Path(out), model=model, progress=progress,
                    use_cache=use_cache, editors=editors, force=force,
                    root=None if root is None else Path(root), budget=budget, dtype=dtype,
                    device=device, device_map=device_map)


def verify_build(build: str | os.PathLike[str], *, spec_path: str | os.PathLike[str] | None = None,
                 max_examples: int | None = None,
                 report_dir: str | os.PathLike[str] | None = None,
                 db_dir: str | os.PathLike[str] | None = None, progress: Progress | None = None,
                 force: bool = False, root: str | os.PathLike[str] | None = None,
                 dtype: str = "float32", device: str | None = None,
                 device_map: str | Mapping[str, object] | None = None,
                 use_cache: bool = True) -> Report:
    """Verify a build directory and write its reports, as ``kmec verify`` does
    (see :func:`kmec.pipeline.verify_build` for the arguments; the base model is loaded
    with ``dtype``, ``device`` or ``device_map``, whatever the build was compiled on)."""
    from kmec.pipeline import verify_build as _verify_build

    def path(p: str | os.PathLike[str] | None) -> Path | None:
        return None if p is None else Path(p)

    return _verify_build(Path(build), spec_path=path(spec_path), max_examples=max_examples,
                         report_dir=path(report_dir), db_dir=path(db_dir), progress=progress,
                         force=force, root=path(root), dtype=dtype, device=device,
                         device_map=device_map, use_cache=use_cache)


class _Package(types.ModuleType):
    """The ``kmec`` module, keeping its verbs when a subpackage of the same name is imported.

    Importing ``kmec.verify.<anything>`` makes the import system bind the subpackage
    as the attribute ``kmec.verify``, which would replace the ``verify`` verb with a
    module (``kmec.verify(...)``: "'module' object is not callable") as soon as
    anything had verified. The verb wins; ``from kmec.verify import Report`` and
    ``import kmec.verify.runner`` still find the subpackage through ``sys.modules``.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" \
                and name in __all__ and callable(self.__dict__.get(name)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
