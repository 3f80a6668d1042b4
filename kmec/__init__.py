"""kmec: a declarative compiler for knowledge edits of language models.

The library is five verbs over five nouns (see docs/ARCHITECTURE.md)::

    spec = kmec.parse(text, path="capitals.kmec")          # text      -> Spec
    plan = kmec.plan(spec, loaded.facts)                   # Spec      -> Plan
    art = kmec.execute(plan, loaded)                       # Plan      -> Artifact
    handle = kmec.apply(art, model)                        # Artifact  -> edited model (revertible)
    report = kmec.verify(spec, plan, base, edited, tok)    # models    -> Report

``kmec.load_model("smollm2-135m")`` gives the ``loaded`` model these take.
Heavy modules (torch, transformers) are imported only when a verb that needs
them is called, so ``import kmec`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from kmec._version import __version__
from kmec.errors import KmecError

__all__ = ["KmecError", "__version__", "apply", "compile_spec", "execute", "load_model", "parse",
           "plan", "verify", "verify_build"]


def parse(text: str, *, path: str = "<string>") -> Any:
    """Parse and check spec text (see :func:`kmec.grammar.parse`)."""
    from kmec.grammar import parse as _parse

    return _parse(text, path=path)


def plan(spec: Any, facts: Any, **kwargs: Any) -> Any:
    """Compile a Spec into a Plan for a model's facts (see :func:`kmec.planner.plan`)."""
    from kmec.planner import plan as _plan

    if "backends" not in kwargs:
        from kmec.backends import BACKENDS

        kwargs["backends"] = BACKENDS
    return _plan(spec, facts, **kwargs)


def execute(plan: Any, loaded: Any, **kwargs: Any) -> Any:
    """Run a plan on a loaded model and return the Artifact (see :func:`kmec.compile.execute`)."""
    from kmec.compile import execute as _execute

    return _execute(plan, loaded, **kwargs)


def apply(artifact: Any, model: Any, **kwargs: Any) -> Any:
    """Apply an Artifact to a model in place; returns a revertible handle."""
    from kmec.artifacts import apply as _apply

    return _apply(artifact, model, **kwargs)


def verify(spec: Any, plan: Any, base: Any, edited: Any, tok: Any, **kwargs: Any) -> Any:
    """Check a spec's claims on base vs edited models (see :func:`kmec.verify.verify`)."""
    from kmec.verify import verify as _verify

    return _verify(spec, plan, base, edited, tok, **kwargs)


def compile_spec(spec_path: Any, **kwargs: Any) -> Any:
    """Compile a spec file into a build directory (see :func:`kmec.pipeline.compile_spec`)."""
    from kmec.pipeline import compile_spec as _compile

    return _compile(spec_path, **kwargs)


def verify_build(build: Any, **kwargs: Any) -> Any:
    """Verify a build directory and write its reports (see :func:`kmec.pipeline.verify_build`)."""
    from kmec.pipeline import verify_build as _verify_build

    return _verify_build(build, **kwargs)


def load_model(ref: str, **kwargs: Any) -> Any:
    """Load a model by alias, folder or hub id (see :func:`kmec.models.load.load_model`).

    A folder written by ``kmec apply`` comes back edited, with its external
    memory (codebook or retrieval) installed (see :func:`kmec.artifacts.edited.load_edited`).
    """
    from pathlib import Path

    if (Path(ref).expanduser() / "kmec_edit.json").is_file():
        from kmec.artifacts.edited import load_edited

        return load_edited(Path(ref).expanduser(), **kwargs)
    from kmec.models.load import load_model as _load

    return _load(ref, **kwargs)
