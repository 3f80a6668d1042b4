"""Consoles for the CLI's tables: full width in CI logs.

Off a terminal (a pipe, a file, a CI log) rich assumes 80 columns and cuts
table cells short ("locality[…"). :func:`out_console` gives such output a
width no line reaches (:data:`PIPE_WIDTH`), so a table is as wide as its
longest cells and prints in full, aligned; text is not wrapped (a log viewer
wraps it). Tables, trees and text do not pad to the console's width, so the
large width costs nothing. On a terminal, and wherever ``COLUMNS`` is set,
rich's own width applies.

Contents:
    out_console()   a Console (stdout or stderr) that prints tables in full off a terminal
    print_json()    ``--json`` output: one JSON document on stdout, nothing else
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console, ConsoleDimensions

# columns for output that goes nowhere with a width of its own: a build path in a deep CI
# workspace made a 240-column stats table cut its corpus cell, so no practical limit
PIPE_WIDTH = 10_000


class _LogConsole(Console):
    """A Console that decides its width at each print, from where its output goes now.

    Rich takes the width of any terminal it finds (stdin's too: ``kmec compile | cat``
    in a shell gets the shell's 80 columns) and fixes it when the Console is made;
    module-level consoles would keep the width of the stream at import time.
    """

    def __init__(self, *, width: int | None = None, **kwargs: object) -> None:
        super().__init__(width=width, **kwargs)  # type: ignore[arg-type]
        if width is None:  # rich fixed COLUMNS as it was at construction (a test's, an
            self._width = None  # import-time shell's): read it at each print instead

    @property
    def size(self) -> ConsoleDimensions:
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        isatty = getattr(self.file, "isatty", None)
        if self._width is None and not os.environ.get("COLUMNS") and not (isatty and isatty()):
            return ConsoleDimensions(PIPE_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def out_console(*, stderr: bool = False, **kwargs: object) -> Console:
    """A Console for stdout (or stderr) that does not truncate tables off a terminal.

    Off a terminal (and without ``COLUMNS``) it is :data:`PIPE_WIDTH` columns wide, on
    a terminal as wide as the terminal; decided at each print, not when it is made.
    """
    return _LogConsole(stderr=stderr, **kwargs)  # type: ignore[arg-type]


def print_json(data: object) -> None:
    """Write ``data`` as indented JSON on stdout: what every command prints with ``--json``.

    Paths and other non-JSON values are written as their strings.
    """
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()
