"""``kmec bench SPEC --methods rome,memit``: one comparison table over methods.

    kmec bench SPEC --methods rome,memit [--single|--batch|--sequence] [--declared]
                    [--limit N] [--max-examples N] [--json] [--md FILE]

Each method compiles (step cache off) and verifies the spec on the same
loaded model; see :mod:`kmec.bench` for what each column measures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Column, Table

from kmec.cli._console import out_console as _out_console
from kmec.cli._progress import reporting
from kmec.cli._runtime import device_map_option, device_option, dtype_option

out_console = _out_console(highlight=False)


def _table(result: Any) -> Table:
    from kmec.bench import METRICS

    cols = [m for m in METRICS if any(r.scores.get(m) is not None for r in result.rows)]
    heads = ("method", *cols, "claims held", "s/edit", "verify s", "peak MB")
    table = Table(*(Column(h, overflow="fold") for h in heads),
                  title=f"kmec bench: {result.mode}, {result.edits} edit(s), {result.model}")
    for r in result.rows:
        if r.error:
            table.add_row(r.method, *(["–"] * len(cols)), "–", "–", "–", "–", style="red")
            continue
        table.add_row(r.method, *("–" if r.scores.get(m) is None else f"{r.scores[m]:.3f}"
                                  for m in cols),
                      f"{r.passed}/{r.checks}", f"{r.s_per_edit:.2f}", f"{r.verify_s:.1f}",
                      f"{r.peak_mb:.0f}")
    return table


def bench_cmd(
    spec: str = typer.Argument(..., help="The .kmec spec to benchmark."),
    methods: str = typer.Option(..., "--methods", "-m", help="Comma-separated backends, "
                                "e.g. rome,memit,alphaedit."),
    single: bool = typer.Option(False, "--single", help="Each edit alone on the unedited model."),
    batch: bool = typer.Option(False, "--batch", help="All edits in one batch."),
    sequence: bool = typer.Option(False, "--sequence", help="Edits one after another."),
    model: str = typer.Option(None, "--model", help="Override the spec's model."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N edits."),
    max_examples: int = typer.Option(None, "--max-examples", min=1,
                                     help="Hypothesis examples per locality property."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    md: str = typer.Option(None, "--md", help="Also write the table as Markdown to this file."),
    force: bool = typer.Option(False, "--force", help="Replace --md even if kmec did not "
                               "write it."),
    root: str = typer.Option(None, "--root", help="Folder the spec's includes and subjects "
                             "files must lie under [default: the spec's repository, else its "
                             "folder]."),
    declared: bool = typer.Option(False, "--declared", help="Compile the spec as written (its "
                                  "paraphrases, scope, preserve and neighbour prompts shown to "
                                  "the compiler). Default: keep every scored prompt out of "
                                  "compilation."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    device_map: str = device_map_option(),
) -> None:
    """Compile and verify SPEC with each method; print efficacy, generality, locality, ... per method."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from kmec.bench import bench, render_markdown
    from kmec.errors import KmecError
    from kmec.pipeline import check_runtime

    check_runtime(dtype, device, device_map)  # a bad flag before the spec is read
    chosen = [m for m, on in (("single", single), ("batch", batch), ("sequence", sequence)) if on]
    if len(chosen) > 1:
        raise KmecError(f"choose one mode, not {' and '.join('--' + m for m in chosen)}")
    if not Path(spec).is_file():
        raise KmecError(f"no spec file {spec!r}", hint="give the path of a .kmec file")
    if md:
        from kmec.outputs import check_output

        check_output(md, "bench-table", inputs=[spec], force=force, flag="--md")
    with reporting("bench") as progress:
        result = bench(spec, methods.split(","), mode=chosen[0] if chosen else None, model=model,
                       limit=limit, max_examples=max_examples, progress=progress, root=root,
                       prompts="declared" if declared else "held out", dtype=dtype,
                       device=device, device_map=device_map)
    if md:
        from kmec.hashing import atomic_write_text
        from kmec.outputs import BENCH_TABLE_HEAD

        try:
            atomic_write_text(md, f"{BENCH_TABLE_HEAD}\n{render_markdown(result)}")
        except OSError as e:
            raise KmecError(f"cannot write --md {md}: {e.strerror or e}") from None
    if as_json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    else:
        out_console.print(_table(result))
        for r in result.rows:
            if r.error:
                out_console.print(f"{r.method}: {escape(r.error)}", style="red", soft_wrap=True)
        out_console.print(f"statistics: {result.stats_s:.1f} s (computed or loaded once, not in "
                          "s/edit)", markup=False)
        out_console.print(f"prompts: {result.prompts} — {result.prompts_note}", markup=False,
                          soft_wrap=True)
    if any(r.error for r in result.rows):
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
