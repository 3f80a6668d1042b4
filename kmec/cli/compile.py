"""``kmec compile SPEC``: parse, plan, execute, write the build directory."""

from __future__ import annotations

from typing import Any

import typer

from kmec.cli._console import out_console, print_json
from kmec.cli._progress import reporting
from kmec.cli._runtime import device_map_option, device_option, dtype_option


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
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON on stdout "
                                 "(build dir, plan hash, steps, attempts, claims)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    device_map: str = device_map_option(),
) -> None:
    """Compile a spec into an artifact (build/plan.json, build/artifact/, ...).

    When the spec declares claims, compile scores them as `kmec verify` would and, while
    some fail, tries the repairs of docs/compile.md within the budget. Exit codes: 0 built
    (and every claim held), 1 built, but some claims are out of reach (the best build is
    written), 2 bad input. The build records the device and dtype it was compiled on.
    """
    from kmec.pipeline import compile_spec

    console = out_console(stderr=True, highlight=False, soft_wrap=True)
    with reporting("compile") as progress:
        result = compile_spec(spec, out=out, model=model, progress=progress,
                              use_cache=not no_cache, force=force, root=root, budget=budget,
                              dtype=dtype, device=device, device_map=device_map)
    from kmec.verify.summary import append_step_summary, compile_summary

    append_step_summary(compile_summary(  # the CI job page, when $GITHUB_STEP_SUMMARY is set
        spec=spec, out=result.out, claims_ok=result.claims_ok, report=result.report,
        attempts=[a.line() for a in result.attempts if a.checks], verdict=result.verdict,
        up_to_date=result.up_to_date))
    if as_json:
        print_json(_as_json(spec, result))
        raise typer.Exit(1 if result.claims_ok is False else 0)
    plan = result.plan
    state = "up to date" if result.up_to_date else f"compiled in {result.seconds:.1f} s"
    n_edits = sum(len(s.edits) for s in plan.steps)
    for a in result.attempts:
        if a.checks:
            console.print(a.line(), markup=False)
    claims = {None: "", True: ", claims hold", False: ", claims FAIL"}[result.claims_ok]
    console.print(f"{spec}: {state}: {len(plan.steps)} step(s), {n_edits} edit(s), "
                  f"plan {plan.sha256[:12]}{claims} -> {result.out}/", markup=False)
    if not result.runtime.is_default:
        console.print(f"  compiled on {result.runtime.describe()}", markup=False)
    if result.claims_ok is False:
        for line in result.verdict.splitlines():
            console.print(f"  {line}", markup=False)
        raise typer.Exit(1)


def _as_json(spec: str, result: Any) -> dict[str, Any]:
    """What ``compile --json`` prints: a stable object made of :class:`BuildResult`'s fields."""
    plan = result.plan
    return {
        "spec": spec, "out": str(result.out), "up_to_date": result.up_to_date,
        "seconds": round(result.seconds, 3), "model": plan.model,
        "model_fingerprint": plan.model_fingerprint, "plan_hash": plan.sha256,
        "artifact_sha256": result.artifact.manifest.sha256,
        "steps": [{"id": s.id, "backend": s.backend, "edits": [e.name for e in s.edits],
                   "layers": list(s.layers)} for s in plan.steps],
        "edits": sum(len(s.edits) for s in plan.steps),
        "claims_ok": result.claims_ok,
        "runtime": result.runtime.to_json(),
        "attempts": [a.to_json() for a in result.attempts],
        "verdict": result.verdict,
    }


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
