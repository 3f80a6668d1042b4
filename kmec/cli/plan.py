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
    elif explain:
        out_console(highlight=False).print(explain_tree(result))
    else:
        out_console(highlight=False).print(summary_table(result))


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
