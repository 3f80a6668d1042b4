"""``kmec verify`` and ``kmec audit``: check an edited model's promises.

    kmec verify build/ [--spec SPEC] [--max-examples N] [--report-dir DIR] [--json]
    kmec audit EDITED_MODEL_DIR --base MODEL --build build/

Exit codes: 0 every claim holds, 1 a claim is violated (the summary names
it), 2 bad input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from kmec.cli._console import out_console as _out_console
from kmec.cli._console import print_json
from kmec.cli._progress import reporting
from kmec.cli._runtime import device_map_option, device_option, dtype_option

out_console = _out_console(highlight=False)


def _passive_omp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (before torch loads).

    On a shared 2-core machine, torch's spinning worker threads fight other
    processes for the cores: verification ran 3-10x slower under load with
    the default (active) wait policy. A value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _summary_table(report: Any) -> Table:
    table = Table("claim", "protocol", "threshold", "pass", "fail", "n/a", "mean", "declared",
                  "held out", "failing edits", title=f"kmec verify: {'PASS' if report.ok else 'FAIL'}",
                  caption="declared: prompts the compiler was shown; held out: prompts it never saw")
    labels = list(dict.fromkeys(r.claim for r in report.claims))
    for label in labels:
        rows = [r for r in report.claims if r.claim == label]
        failing = [r.edit for r in rows if r.status == "fail"]
        mean = report.aggregate.means.get(label)
        split = report.aggregate.split.get(label)
        table.add_row(escape(label), rows[0].protocol, f"{rows[0].threshold:g}",
                      str(sum(r.status == "pass" for r in rows)), str(len(failing)),
                      str(sum(r.status == "n/a" for r in rows)),
                      "–" if mean is None else f"{mean:.3f}",
                      _part(split.declared if split else None), _part(split.heldout if split else None),
                      escape(_first(failing, 6)),
                      style=None if not failing else "red")
    a, c = report.audit, report.capability
    table.add_row("audit", "weights", "", "1" if a.ran and a.ok else "0",
                  "1" if not a.ok else "0", "0" if a.ran else "1", "", "", "",
                  ", ".join(a.undeclared[:4]),
                  style=None if a.ok else "red")
    if c.ran:
        table.add_row("capability", "ppl+questions", "", "1" if c.ok else "0",
                      "0" if c.ok else "1", "0", f"{c.ppl_ratio:.4f}", "", "", "",
                      style=None if c.ok else "red")
    return table


def _first(names: list[str], n: int) -> str:
    """The first ``n`` names and how many more (an elided cell would read as cut short).

    >>> _first(["a", "b", "c"], 2), _first(["a"], 2)
    ('a, b and 1 more', 'a')
    """
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _part(score: float | None) -> str:
    return "–" if score is None else f"{score:.3f}"


def _runtime_line(target: str, device: str | None, dtype: str, device_map: str | None) -> str:
    """Where the build was compiled and where it was verified."""
    import json

    from kmec.artifacts.build import INFO, build_root, build_runtime
    from kmec.models.load import Runtime, native_bf16, resolve_device, resolve_dtype

    info_path = build_root(target) / INFO
    try:
        compiled = Runtime.from_json(build_runtime(json.loads(info_path.read_text())))
        where = f"compiled on {compiled.describe()}; "
    except (OSError, ValueError, AttributeError):
        where = ""  # a bare artifact records no runtime
    if device_map:
        return f"{where}verified on device map {device_map}, {resolve_dtype(dtype)}"
    here = resolve_device(device)
    return (f"{where}verified on "
            f"{Runtime(here, resolve_dtype(dtype), bf16_units=native_bf16(here)).describe()}")


def verify_cmd(
    target: str = typer.Argument(..., help="Build directory (kmec compile's output) or artifact folder."),
    spec: str = typer.Option(None, "--spec", help="Spec file to take the claims from "
                             "(required for a bare artifact)."),
    max_examples: int = typer.Option(None, "--max-examples", min=1,
                                     help="Hypothesis examples per locality property "
                                     "(overrides the claims' `sample`)."),
    report_dir: str = typer.Option(None, "--report-dir", help="Where to write the reports "
                                   "[default: BUILD/report]."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout."),
    force: bool = typer.Option(False, "--force", help="Write the reports into --report-dir "
                               "even if it holds files kmec did not write."),
    root: str = typer.Option(None, "--root", help="Folder the spec's subjects files must lie "
                             "under [default: the repository of --spec, or of the build]."),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Compute everything here instead of reading what compile "
        "kept in $KMEC_HOME/verify (the drawn neighbourhoods, the base model's scores); "
        "the report is the same either way."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    device_map: str = device_map_option(),
) -> None:
    """Verify every claim of the spec on the edited model; write JSON/JUnit/Markdown/HTML reports."""
    _passive_omp()
    from kmec.pipeline import default_report_dir, verify_build
    from kmec.verify.render import to_json

    folder = Path(report_dir) if report_dir else default_report_dir(target)
    with reporting("verify") as progress:
        report = verify_build(target, spec_path=spec, max_examples=max_examples,
                              report_dir=folder, progress=progress, force=force, root=root,
                              dtype=dtype, device=device, device_map=device_map,
                              use_cache=not no_cache)
    from kmec.verify.summary import append_step_summary, verify_summary

    append_step_summary(verify_summary(report, target=target, report_dir=folder))  # CI job page
    if as_json:
        sys.stdout.write(to_json(report))
    else:
        out_console.print(_summary_table(report))
        style = "green" if report.ok else "bold red"
        out_console.print(report.summary, style=style, markup=False, soft_wrap=True)
        out_console.print(_runtime_line(target, device, dtype, device_map), markup=False,
                          soft_wrap=True)
        out_console.print(f"reports: {folder}/report.html (also report.json, junit.xml, report.md)",
                          markup=False, soft_wrap=True)
    raise typer.Exit(report.exit_code)


def audit_cmd(
    edited: str = typer.Argument(..., help="Folder of the edited model to audit."),
    base: str = typer.Option(..., "--base", help="The base model (alias, folder or hub id)."),
    build: str = typer.Option(..., "--build", help="Build directory (or artifact folder) "
                              "that declares the edit."),
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON on stdout."),
) -> None:
    """Prove an edited model differs from its base only by the artifact's declared deltas."""
    _passive_omp()
    from kmec.artifacts import audit, check_base
    from kmec.artifacts.build import load_checked
    from kmec.artifacts.edited import load_weights
    from kmec.models.load import fingerprint_model

    artifact = load_checked(build)
    with reporting("audit") as progress, progress.stage("loading models"):
        base_model, _ = load_weights(base)
        # the wrong base would show every parameter as an "undeclared change": say so instead
        check_base(artifact.manifest, fingerprint_model(base_model), model=base)
        edited_model, _ = load_weights(edited)
    result = audit(base_model, edited_model, artifact)
    if as_json:
        print_json({"ok": result.ok, "checked": result.checked, "max_error": result.max_error,
                    "declared": list(artifact.manifest.params),
                    "mismatched": list(result.mismatched), "undeclared": list(result.undeclared),
                    "nonfinite": list(result.nonfinite), "summary": result.summary()})
        raise typer.Exit(0 if result.ok else 1)
    table = Table("parameter", "status")
    for name in artifact.manifest.params:
        table.add_row(escape(name), "mismatched" if name in result.mismatched else "declared, matches")
    for name in result.undeclared:
        table.add_row(escape(name), "UNDECLARED CHANGE", style="red")
    out_console.print(table)
    out_console.print(result.summary(), style="green" if result.ok else "bold red", markup=False,
                      soft_wrap=True)
    raise typer.Exit(0 if result.ok else 1)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_cmd)
    app.command("audit")(audit_cmd)
