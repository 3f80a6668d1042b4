"""``kmec plan SPEC``: compile a spec into a plan and show it (no weights are loaded).

Prints a step table by default, every choice with its reason with
``--explain``, or the canonical plan JSON with ``--json`` (the exact bytes
``kmec compile`` hashes). ``kmec plan build/`` (or ``build/plan.json``) shows the
plan a compile executed instead, with the repairs it made among the reasons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from kmec.cli._console import out_console


def plan_command(
    spec: Path = typer.Argument(..., exists=True, help="The .kmec spec file, or a build "
                                "directory (or its plan.json) to show the plan it executed."),
    explain: bool = typer.Option(False, "--explain", help="Show every choice and its reason."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as canonical JSON."),
    model: str | None = typer.Option(None, "--model", metavar="REF",
                                     help="Model to plan for (default: the spec's `model`, "
                                     "else smollm2-135m)."),
    root: str = typer.Option(None, "--root", help="Folder the spec's includes and subjects "
                             "files must lie under [default: the spec's repository, else its "
                             "folder]."),
) -> None:
    """Show what `kmec compile` would do with SPEC, and why."""
    from kmec.grammar import parse_file
    from kmec.models.facts_io import facts_for_ref
    from kmec.models.load import DEFAULT_MODEL
    from kmec.planner import plan
    from kmec.planner.explain import explain_tree, summary_table

    executed = _executed_plan(spec)
    if executed is not None:
        result = executed
    else:
        parsed = parse_file(spec, root=root)
        facts = facts_for_ref(model or parsed.model or DEFAULT_MODEL)
        from kmec.backends import BACKENDS
        from kmec.backends.mend.store import planner_editors

        result = plan(parsed, facts, backends=BACKENDS,
                      editors=planner_editors(facts.fingerprint))
    if as_json:
        typer.echo(result.to_json(), nl=False)
        return
    console = out_console(highlight=False)
    console.print(explain_tree(result) if explain else summary_table(result))
    if executed is not None:
        where = _compiled_on(spec)
        if where:
            console.print(where, markup=False)
    if executed is None:
        console.print(estimate_note(result, facts, model or parsed.model or DEFAULT_MODEL),
                      markup=False)


# What the cost model was calibrated on (kmec/planner/costs.py): say it next to the figures.
CALIBRATION = "2-core x86 CPU, fp32"


def estimate_note(result: Any, facts: Any, ref: str) -> str:
    """The estimate's caveat, and what statistics already in the cache take off it.

    The planner is pure: it charges every step the statistics pass on first use. Here,
    where the cache can be read, the layers a compile would find cached are looked up
    (with the tokenizer, whose hash keys the cache) and their pass is taken off.
    """
    from kmec.planner.explain import layer_span
    from kmec.planner.passes.estimate_cost import statistics_seconds

    total = sum(s.cost.seconds for s in result.steps)
    saved, cached_spans = 0.0, []
    seen = set()
    for step in result.steps:
        req = step.needs_stats
        if req is None or req in seen:
            continue
        seen.add(req)
        cached = _cached_layers(facts, ref, req)
        if not cached:
            continue
        missing = tuple(l for l in req.layers if l not in cached)
        saved += statistics_seconds(req, facts) - statistics_seconds(req, facts, layers=missing)
        cached_spans.append(layer_span(cached))
    note = f"~seconds: rough estimates for a {CALIBRATION} (the cost model's calibration)"
    if saved > 0:
        note += (f"; statistics for layers {', '.join(cached_spans)} are cached, so "
                 f"~{saved:.0f} s of the ~{total:.0f} s is not spent: ~{total - saved:.0f} s")
    return note


def _cached_layers(facts: Any, ref: str, request: Any) -> tuple[int, ...]:
    """The request's layers in the statistics cache; () when that cannot be told cheaply."""
    import logging

    from kmec.errors import KmecError
    from kmec.models.adapters import adapter_for
    from kmec.models.load import resolve_ref
    from kmec.stats.engine import cached_layers

    try:
        resolved = resolve_ref(ref)
        if resolved.path is None:  # a hub id: nothing local to read the tokenizer from
            return ()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(resolved.path), local_files_only=True)
        return cached_layers(facts, tok, adapter_for(facts.model_type), request)
    except (KmecError, OSError, ValueError) as e:
        logging.getLogger("kmec").debug("cannot look the statistics cache up: %s", e)
        return ()


def _compiled_on(path: Path) -> str:
    """``compiled on cpu, float32``: where the build around ``path`` ran ("" when ``path``
    is a plan.json outside a build)."""
    import json

    from kmec.artifacts.build import INFO, build_runtime
    from kmec.models.load import Runtime

    info = (path if path.is_dir() else path.parent) / INFO
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    return f"compiled on {Runtime.from_json(build_runtime(data)).describe()}"


def _executed_plan(path: Path) -> Any:
    """The plan in a build directory or a ``plan.json`` (None: ``path`` is a spec).

    Raises:
        VerifyError: a folder without plan.json, or a plan.json that is not a kmec plan.
    """
    from pydantic import ValidationError

    from kmec.errors import VerifyError
    from kmec.planner.model import Plan

    if path.is_dir():
        path = path / "plan.json"
        if not path.is_file():
            raise VerifyError(f"{path.parent} holds no plan.json",
                              hint="pass a .kmec spec, or the folder kmec compile wrote")
    elif path.name != "plan.json":
        return None
    try:
        return Plan.model_validate_json(path.read_text())
    except (OSError, UnicodeDecodeError, ValidationError):
        raise VerifyError(f"{path} is not a kmec plan", hint="pass the plan.json kmec compile "
                          "wrote, or a .kmec spec") from None


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
