"""The ``kmec`` command line: parses flags and calls the library.

Contents:
    app      the typer application; each ``kmec.cli.<name>`` module listed in
             COMMAND_MODULES adds its commands through ``register(app)``
    main()   entry point: KmecError -> one clear message and exit code 2
             (no traceback unless ``--debug``)

Exit codes: 0 success, 1 a verified claim is violated, 2 bad input or an error
kmec explains.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click
import typer

try:  # typer >= 0.2x vendors its own copy of click
    from typer._click import exceptions as _tclick
except ImportError:  # pragma: no cover - older typer uses click itself
    _tclick = click.exceptions

_CLICK_ERRORS = (click.ClickException, _tclick.ClickException)
_USAGE_ERRORS = (click.UsageError, _tclick.UsageError)
_ABORTS = (click.exceptions.Abort, typer.Abort)
_EXITS = (click.exceptions.Exit, typer.Exit)
from rich.console import Console

from kmec._version import __version__
from kmec.errors import KmecError

# Each module defines ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = ("kmec.cli.model", "kmec.cli.compile", "kmec.cli.stats", "kmec.cli.plan",
                   "kmec.cli.spec", "kmec.cli.verify", "kmec.cli.artifact", "kmec.cli.trace",
                   "kmec.cli.data", "kmec.cli.bench", "kmec.cli.train_editor", "kmec.cli.diff")

EXIT_CODES = ("Exit codes: 0 success; 1 a verdict against you: claims that do not hold "
              "(compile, verify), an audit that finds undeclared changes, differences (diff), "
              "files fmt --check would change; 2 bad input or a refused operation; 130 "
              "interrupted.")

app = typer.Typer(
    name="kmec",
    help="kmec: compile declared knowledge edits into edited models, and verify them.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kmec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print errors and results."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("kmec").setLevel(level)
    for noisy in ("transformers", "huggingface_hub", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


_loaded: list[str] = []


def _load_commands() -> None:
    """Register every command once (main() may run many times in one process: tests)."""
    if _loaded:
        return
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
        _loaded.append(name)
    for info in [*app.registered_commands,
                 *(c for g in app.registered_groups if g.typer_instance is not None
                   for c in g.typer_instance.registered_commands)]:
        if info.epilog is None:  # every command's --help lists the exit codes
            info.epilog = EXIT_CODES


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; never shows a traceback for a KmecError unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("KMEC_DEBUG") == "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Idle OpenMP threads that spin make forward passes 3-10x slower on small,
    # shared machines (measured on 2 cores); sleeping costs nothing measurable.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _load_commands()
    try:
        rc = app(args=args, prog_name="kmec", standalone_mode=False)
    except KmecError as e:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        sys.exit(e.exit_code)
    except _ABORTS:
        err_console.print("aborted")
        sys.exit(130)
    except _CLICK_ERRORS as e:
        e.show()
        sys.exit(2 if isinstance(e, _USAGE_ERRORS) else e.exit_code)
    except _EXITS as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as e:  # a file-system refusal no command anticipated: still no traceback
        if debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        err_console.print(f"error: {e.strerror or e}{where}", markup=False, highlight=False)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)
