"""The one progress callback type every long-running stage takes.

Contents:
    Progress   ``progress(message, done, total)``: called as work advances

The library never prints: it calls ``progress`` (when given), and the CLI
turns the calls into bars on a terminal and into lines in a CI log.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]

__all__ = ["Progress"]
