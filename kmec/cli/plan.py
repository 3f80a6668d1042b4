"""``kmec plan SPEC``: compile a spec into a plan and show it (no weights are loaded).

Prints a step table by default, every choice with its reason with
``--explain``, or the canonical plan JSON with ``--json`` (the exact bytes
``kmec compile`` hashes).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(highlight=False)


def plan_command(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .kmec spec file."),
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

    parsed = parse_file(spec, root=root)
    facts = facts_for_ref(model or parsed.model or DEFAULT_MODEL)
    from kmec.backends import BACKENDS
    from kmec.backends.mend.store import planner_editors

    result = plan(parsed, facts, backends=BACKENDS, editors=planner_editors(facts.fingerprint))
    if as_json:
        typer.echo(result.to_json(), nl=False)
    elif explain:
        console.print(explain_tree(result))
    else:
        console.print(summary_table(result))


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
