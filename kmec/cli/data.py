"""``kmec import``: write a ``.kmec`` spec from a benchmark's public release file.

Contents:
    import_cmd()  read records, map them to a spec, check it, write it (or print it)
    register()    add ``import`` to the ``kmec`` app (``import`` is a Python keyword,
                  hence the function's name)

The spec starts with a comment that records the command, the source file's
sha256 and everything the language could not express. It is checked (exactly
as ``kmec check`` would) before it is written; the write is atomic.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

from kmec.cli._console import print_json
from kmec.errors import KmecError, SpecError


def _command(dataset: str, file: Path, limit: int | None, offset: int, out: Path | None,
             model: str | None) -> str:
    parts = ["kmec", "import", dataset, os.fspath(file)]
    if limit is not None:
        parts += ["--limit", str(limit)]
    if offset:
        parts += ["--offset", str(offset)]
    if out is not None:
        parts += ["-o", os.fspath(out)]
    if model:
        parts += ["--model", model]
    return shlex.join(parts)


def _write(path: Path, text: str) -> None:
    """Write atomically, keeping an existing file's mode (a new one gets the umask's)."""
    from kmec.hashing import atomic_write_text

    if path.is_file():
        mode = path.stat().st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    atomic_write_text(path, text)
    os.chmod(path, mode)  # the temporary file was created 0600


def import_cmd(
    dataset: str = typer.Argument(..., help="counterfact (ROME or EasyEdit format), zsre, "
                                  "mquake or knowedit."),
    file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                help="The release file (JSON array or JSON Lines)."),
    limit: int | None = typer.Option(None, "--limit", min=0, metavar="N",
                                     help="Import at most N records."),
    offset: int = typer.Option(0, "--offset", min=0, metavar="N",
                               help="Skip the first N records."),
    out: Path | None = typer.Option(None, "--output", "-o", dir_okay=False, metavar="OUT.kmec",
                                    help="Write the spec here (default: print it)."),
    model: str | None = typer.Option(None, "--model", metavar="REF",
                                     help="Model reference to write into the spec."),
    force: bool = typer.Option(False, "--force", help="Replace -o even if it is not a spec "
                               "kmec import wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON on stdout "
                                 "(with the spec's text when there is no -o)."),
) -> None:
    """Write a .kmec spec from CounterFact, zsRE, MQuAKE or KnowEdit records."""
    from kmec.data import import_file
    from kmec.grammar import analyze
    from kmec.outputs import check_output

    if out is not None:
        check_output(out, "spec", inputs=[file], force=force, flag="-o")
    command = _command(dataset, file, limit, offset, out, model)
    result = import_file(dataset, file, limit=limit, offset=offset, model=model,
                         command=command)
    text = result.text
    analysis = analyze(text, path=os.fspath(out) if out else "<import>")
    if analysis.errors:  # a bug in an importer: say so rather than write a bad spec
        raise SpecError(analysis.errors)
    if out is None and not as_json:
        typer.echo(text, nl=False)
    elif out is not None:
        try:
            _write(out, text)
        except OSError as e:
            raise KmecError(f"cannot write -o {out}: {e.strerror or e}") from None
    s = result.spec
    if as_json:
        print_json({"dataset": dataset, "source": os.fspath(file), "records": result.records,
                    "output": os.fspath(out) if out is not None else None,
                    "edits": len(s.edits), "relations": len(s.relations),
                    "claims": len(s.claims), "spec": None if out is not None else text})
        return
    counts = ", ".join(_count(len(items), noun) for items, noun in
                       ((s.edits, "edit"), (s.relations, "relation"), (s.claims, "claim")))
    typer.echo(f"{'wrote ' + os.fspath(out) if out else 'imported'}: {counts} from "
               f"{_count(result.records, 'record')} (the header lists what was left out)",
               err=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
