"""``kmec diff A B``: what changed between two specs, two builds or two reports.

    kmec diff OLD NEW [--md] [--json]

Exit codes, as diff(1): 0 nothing differs, 1 something differs, 2 bad input.
See :mod:`kmec.diff` for what is compared.
"""

from __future__ import annotations

import sys

import typer


def diff_cmd(
    a: str = typer.Argument(..., help="The old side: a .kmec file, a build directory, or a "
                            "report (report.json or its folder)."),
    b: str = typer.Argument(..., help="The new side, of any of the same kinds."),
    md: bool = typer.Option(False, "--md", help="Print Markdown tables (for a pull request)."),
    as_json: bool = typer.Option(False, "--json", help="Print every change as JSON."),
    root: str = typer.Option(None, "--root", help="Folder the specs' includes and subjects "
                             "files must lie under [default: each spec's repository]."),
) -> None:
    """Compare two specs, two builds or two reports: edits, claims, plan and scores that moved.

    Exit codes: 0 no differences, 1 differences, 2 bad input.
    """
    from kmec.diff import diff, read_side, render_markdown, render_text

    result = diff(read_side(a, root=root), read_side(b, root=root))
    if as_json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    elif md:
        sys.stdout.write(render_markdown(result))
    else:
        sys.stdout.write(render_text(result))
    raise typer.Exit(1 if result.changes else 0)


def register(app: typer.Typer) -> None:
    app.command("diff")(diff_cmd)
