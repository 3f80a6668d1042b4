"""``kmec check | fmt | schema``: the spec language at the command line.

Contents:
    check()     parse and check specs; print every diagnostic; exit 0, or 2 on errors
    fmt()       rewrite specs in canonical form (atomically), or --check / --diff them
    schema()    print the Spec's JSON Schema
    register()  add the three commands to the ``kmec`` app

Arguments may be files or folders (every ``*.kmec`` below, except files that
other files there include). Diagnostics go to stderr in the compiler format
``file:line:col: error: message``, with the source line, a caret and a hint.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import typer

from kmec.errors import Diagnostic, SpecError
from kmec.grammar import Analysis, analyze_dir, analyze_file, format_text, spec_files
from kmec.grammar.loader import not_a_spec, read_spec_text
from kmec.hashing import atomic_write_text
from kmec.spec import spec_json_schema

SPECS = typer.Argument(..., help="Spec files, or folders to search for *.kmec files.",
                       show_default=False)


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):  # a name too long, a NUL: not a folder (read_spec_text says why)
        return False


def _analyses(paths: list[Path], root: str | None) -> list[tuple[str, Analysis]]:
    found: list[tuple[str, Analysis]] = []
    for p in paths:
        if _is_dir(p):
            found += [(a.files[0], a) for a in analyze_dir(p, root=root)]
        else:
            found.append((os.fspath(p), analyze_file(p, root=root)))
    return found


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _echo_diagnostic(d: Diagnostic) -> None:
    typer.echo(d.render(), err=True)


def _as_json(d: Diagnostic) -> dict[str, object]:
    s = d.span
    return {"file": s.file, "line": s.line, "col": s.col, "end_line": s.end_line,
            "end_col": s.end_col, "severity": d.severity, "message": d.message, "hint": d.hint}


def check(
    specs: list[Path] = SPECS,
    as_json: bool = typer.Option(False, "--json", help="Print diagnostics as JSON on stdout."),
    strict: bool = typer.Option(False, "--strict", help="Treat warnings as errors."),
    root: str = typer.Option(None, "--root", help="Folder the specs' includes and subjects "
                             "files must lie under [default: each spec's repository, else its "
                             "folder]."),
) -> None:
    """Parse and check specs: syntax, names, templates, thresholds, includes."""
    results = _analyses(specs, root)
    failed = False
    report = []
    for name, a in results:
        bad = bool(a.errors) or (strict and bool(a.warnings))
        failed |= bad
        if as_json:
            report.append({"file": name, "ok": not bad,
                           "diagnostics": [_as_json(d) for d in a.diagnostics]})
            continue
        for d in a.diagnostics:
            _echo_diagnostic(d)
        if a.spec is not None and not bad:
            s = a.spec
            counts = [_count(len(s.relations), "relation"), _count(len(s.edits), "edit"),
                      _count(len(s.claims), "claim")]
            if a.warnings:
                counts.append(_count(len(a.warnings), "warning"))
            typer.echo(f"ok {name}: {', '.join(counts)}")
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    elif not results:
        typer.echo("no spec files found", err=True)
    if failed or not results:
        raise typer.Exit(2)


def _format_one(path: Path, check_only: bool, diff: bool) -> tuple[str, str]:
    """('same', 'changed' or 'error', the unified diff when ``diff``) for one file
    (writing it unless check_only/diff)."""
    name = os.fspath(path)
    try:
        text = read_spec_text(path)
    except SpecError as e:  # a refusal names the file and the rule: shown as it is
        for d in e.diagnostics:
            _echo_diagnostic(d)
        return "error", ""
    try:
        formatted = format_text(text, path=name)
    except SpecError as e:
        shown = e.diagnostics if name.endswith(".kmec") else not_a_spec(name, e.diagnostics)
        for d in shown:
            _echo_diagnostic(d)
        return "error", ""
    if formatted == text:
        return "same", ""
    patch = "".join(difflib.unified_diff(
        text.splitlines(keepends=True), formatted.splitlines(keepends=True),
        fromfile=f"{name} (original)", tofile=f"{name} (formatted)")) if diff else ""
    if check_only:
        typer.echo(f"would reformat {name}", err=True)
    elif not diff:
        mode = path.stat().st_mode & 0o7777
        atomic_write_text(path, formatted)
        os.chmod(path, mode)  # the temporary file was created 0600
        typer.echo(f"reformatted {name}", err=True)
    return "changed", patch


def fmt(
    specs: list[Path] = SPECS,
    check_only: bool = typer.Option(False, "--check",
                                    help="Write nothing; exit 1 if a file would change."),
    diff: bool = typer.Option(False, "--diff", help="Print a diff instead of writing."),
    as_json: bool = typer.Option(False, "--json", help="Print each file's outcome (same, "
                                 "changed, error; with --diff its diff) as JSON on stdout."),
) -> None:
    """Rewrite specs in canonical layout, keeping comments (exit 1 with --check if not)."""
    files: list[Path] = []
    for p in specs:
        files += spec_files(p) if _is_dir(p) else [p]
    done = [_format_one(p, check_only, diff) for p in files]
    outcomes = [o for o, _ in done]
    if as_json:
        written = not (check_only or diff)
        typer.echo(json.dumps([{"file": os.fspath(p), "status": o, "written": written and
                                o == "changed", **({"diff": patch} if diff else {})}
                               for p, (o, patch) in zip(files, done, strict=True)],
                              indent=2, ensure_ascii=False))
    else:
        for _, patch in done:
            if patch:
                typer.echo(patch, nl=False)
    changed = outcomes.count("changed")
    verb = "would be reformatted" if check_only or diff else "reformatted"
    typer.echo(f"{_count(len(files), 'file')}: {changed} {verb}, "
               f"{outcomes.count('same')} unchanged"
               + (f", {outcomes.count('error')} with errors" if "error" in outcomes else ""),
               err=True)
    if "error" in outcomes:
        raise typer.Exit(2)
    if check_only and changed:
        raise typer.Exit(1)


def schema() -> None:  # no --json: its one output is a JSON document already
    """Print the JSON Schema of a Spec (what a .kmec file compiles to)."""
    typer.echo(json.dumps(spec_json_schema(), indent=2, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("check")(check)
    app.command("fmt")(fmt)
    app.command("schema")(schema)
