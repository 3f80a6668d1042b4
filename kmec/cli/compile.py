"""``kmec compile SPEC``: parse, plan, execute, write the build directory."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False, stderr=True)


def compile_cmd(
    spec: str = typer.Argument(..., help="The .kmec spec to compile."),
    out: str = typer.Option("build", "--out", "-o", help="Build directory to write."),
    model: str = typer.Option(None, "--model", help="Override the spec's model."),
    no_cache: bool = typer.Option(
        False, "--no-cache",
        help="Recompute every step and every target value (statistics stay cached)."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if kmec did not "
                               "write it (everything in it is lost)."),
    root: str = typer.Option(None, "--root", help="Folder the spec's includes and subjects "
                             "files must lie under [default: the spec's repository, else its "
                             "folder]."),
    budget: float = typer.Option(None, "--budget", min=0, help="Seconds the compile may take, "
                                 "repairs of failing claims included [default: the spec's "
                                 "`budget`, else 300]; 0 skips scoring the claims."),
) -> None:
    """Compile a spec into an artifact (build/plan.json, build/artifact/, ...).

    When the spec declares claims, compile scores them as `kmec verify` would and, while
    some fail, tries the repairs of docs/compile.md within the budget. Exit codes: 0 built
    (and every claim held), 1 built, but some claims are out of reach (the best build is
    written), 2 bad input.
    """
    from kmec.pipeline import compile_spec

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(message: str, done: int, total: int) -> None:
            key = message.split(":")[0]
            if key not in tasks:
                tasks[key] = bar.add_task(message, total=total)
            bar.update(tasks[key], description=message, completed=done, total=total)

        result = compile_spec(spec, out=out, model=model, progress=progress,
                              use_cache=not no_cache, force=force, root=root, budget=budget)
    plan = result.plan
    state = "up to date" if result.up_to_date else f"compiled in {result.seconds:.1f} s"
    n_edits = sum(len(s.edits) for s in plan.steps)
    for a in result.attempts:
        if a.checks:
            console.print(a.line())
    claims = {None: "", True: ", claims hold", False: ", claims FAIL"}[result.claims_ok]
    console.print(f"{spec}: {state}: {len(plan.steps)} step(s), {n_edits} edit(s), "
                  f"plan {plan.sha256[:12]}{claims} -> {result.out}/")
    if result.claims_ok is False:
        for line in result.verdict.splitlines():
            console.print(f"  {line}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
