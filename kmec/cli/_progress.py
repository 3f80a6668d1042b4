"""Progress for every CLI command: a rich bar on a terminal, plain lines in a CI log.

Contents:
    reporting()        context manager: the reporter a command hands to the library
    Reporter           the interface: ``reporter(message, done, total)``, ``stage(message)``
    LineReporter       off a terminal: throttled lines on stderr with rate and ETA
    BarReporter        on a terminal: rich bars (as the commands always showed)
    PROGRESS_INTERVAL_S / ENV_INTERVAL   seconds between two lines of one message

The library reports work through :data:`kmec.progress.Progress` callbacks,
``progress(message, done, total)``. Off a terminal a transient rich bar writes
nothing into a log until a step ends, so :class:`LineReporter` writes lines such as::

    compile: rome france  3/12  0.41/s  ETA 22s

one at each new message (the text before its first ``:``: ``train: loss 1.23``
and ``train: loss 1.19`` are one message), otherwise at most one every
``KMEC_PROGRESS_INTERVAL`` seconds (default :data:`PROGRESS_INTERVAL_S`), one when a
count completes (with its time), and a last line with the command's elapsed time. With ``kmec --quiet``
(the ``kmec`` logger above INFO) nothing is written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from kmec.errors import KmecError

PROGRESS_INTERVAL_S = 5.0  # at most one line per this many seconds while a message repeats
ENV_INTERVAL = "KMEC_PROGRESS_INTERVAL"


class Reporter(Protocol):
    """What a command passes to the library as its ``progress`` callback."""

    def __call__(self, message: str, done: int, total: int) -> None: ...

    def stage(self, message: str) -> Iterator[None]: ...


def interval_from_env() -> float:
    """Seconds between two lines of one message: ``$KMEC_PROGRESS_INTERVAL`` or the default.

    Raises:
        KmecError: the variable is set to something that is not a number of seconds >= 0.
    """
    text = os.environ.get(ENV_INTERVAL, "").strip()
    if not text:
        return PROGRESS_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise KmecError(f"{ENV_INTERVAL}={text!r} is not a number of seconds",
                        hint=f"set it to e.g. 0 (every update) or 10, or unset it "
                        f"(default {PROGRESS_INTERVAL_S:g})")
    return value


def format_seconds(s: float) -> str:
    """A duration for a log line.

    >>> format_seconds(4.25), format_seconds(22.4), format_seconds(185), format_seconds(7300)
    ('4.2s', '22s', '3m05s', '2h01m')
    """
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m}m{sec:02d}s"
    h, m = divmod(round(s) // 60, 60)
    return f"{h}h{m:02d}m"


def format_rate(per_s: float) -> str:
    """Items per second, with as many digits as mean something.

    >>> format_rate(0.4123), format_rate(3.456), format_rate(12345.6)
    ('0.41/s', '3.5/s', '12,346/s')
    """
    if per_s >= 100:
        return f"{per_s:,.0f}/s"
    return f"{per_s:.2g}/s"


@dataclass
class _Series:
    """One count being reported: a message prefix with a total, from an anchor time."""

    key: str
    total: int
    anchor_t: float
    last_done: int


class LineReporter:
    """Plain, throttled progress lines (for pipes, files and CI logs).

    A *series* is one count: the message up to its first ``:`` (so ``rome a``,
    ``memit: layer 3`` and ``memit: layer 4`` are told apart from ``memit: target values``
    only by their totals) with one total; a lower ``done`` starts a new one. A series
    that other counts interrupted (``verifying the claims`` around ``scoring``)
    resumes with its own start. Its rate is counted from the report before it began
    (when the work began), so the first line of a series already has a rate when
    ``done`` > 0.
    """

    def __init__(self, command: str, *, write: Callable[[str], object] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.command = command
        self._write = write or _to_stderr
        self._clock = clock
        self.interval = interval_from_env() if interval is None else interval
        self.t0 = self._last_event = clock()
        self._open: dict[str, _Series] = {}  # counts not finished yet, by key
        self._current = ""  # the key of the last report
        self._printed_t = -float("inf")

    def __call__(self, message: str, done: int, total: int) -> None:
        now = self._clock()
        key = message.split(":")[0]
        s = self._open.get(key)
        new = s is None or s.total != total or done < s.last_done
        if s is None or new:
            s = self._open[key] = _Series(key, total, self._last_event if done > 0 else now, 0)
        s.last_done = done
        switched, self._current = key != self._current, key
        self._last_event = now
        finished = total > 0 and done >= total
        if finished:
            del self._open[key]
        if not (new or switched or finished or now - self._printed_t >= self.interval):
            return
        self._printed_t = now
        self._emit(self._line(message, done, total, now - s.anchor_t, finished))

    def _line(self, message: str, done: int, total: int, elapsed: float, finished: bool) -> str:
        parts = [f"{self.command}: {message}"]
        if total > 0:
            parts.append(f"{done:,}/{total:,}")
            rate = done / elapsed if done > 0 and elapsed > 0 else None
            if rate is not None and total > 1:  # "1/1 0.33/s" says nothing "in 3.0s" does not
                parts.append(format_rate(rate))
            if finished:
                parts.append(f"in {format_seconds(elapsed)}")
            elif rate is not None:
                parts.append(f"ETA {format_seconds((total - done) / rate)}")
        return "  ".join(parts)

    @contextmanager
    def stage(self, message: str) -> Iterator[None]:
        """A step without counts: a line when it starts, one with its time when it ends."""
        self(message, 0, 1)
        yield
        self(message, 1, 1)

    def close(self) -> None:
        self._emit(f"{self.command}: finished in {format_seconds(self._clock() - self.t0)}")

    def _emit(self, line: str) -> None:
        self._write(line + "\n")


def _to_stderr(text: str) -> None:
    sys.stderr.write(text)  # looked up per line: tests (and callers) may swap the stream
    sys.stderr.flush()


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else format_rate(speed))


class BarReporter:
    """Rich bars on a terminal: one bar per series (the message up to its first ``:``)."""

    def __init__(self, console: Console, *, transient: bool = True) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            _Rate(), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console, transient=transient)
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, message: str, done: int, total: int) -> None:
        key = message.split(":")[0]
        size = total if total > 0 else None
        if key not in self._tasks:
            self._tasks[key] = self.bar.add_task(message, total=size)
        self.bar.update(self._tasks[key], description=message, completed=done, total=size)

    @contextmanager
    def stage(self, message: str) -> Iterator[None]:
        self(message, 0, 0)
        yield
        self(message, 1, 1)


class _Silent:
    def __call__(self, message: str, done: int, total: int) -> None:
        return None

    @contextmanager
    def stage(self, message: str) -> Iterator[None]:
        yield


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (``FORCE_COLOR`` in a CI job does not make it one)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def quiet() -> bool:
    """``kmec --quiet`` sets the ``kmec`` logger to WARNING: progress is INFO, so none."""
    return logging.getLogger("kmec").getEffectiveLevel() > logging.INFO


@contextmanager
def reporting(command: str, *, transient: bool = True, enabled: bool = True
              ) -> Iterator[Reporter]:
    """The progress reporter of ``command`` for as long as the block runs.

    On a terminal (stderr) a rich bar; elsewhere :class:`LineReporter` lines on
    stderr and, when the block ends without an error, a line with the elapsed time;
    nothing with ``--quiet`` or ``enabled=False``. Stdout is never written.

    Raises:
        KmecError: ``$KMEC_PROGRESS_INTERVAL`` is not a number of seconds.
    """
    if not enabled or quiet():
        yield _Silent()
    elif stderr_is_terminal():
        bars = BarReporter(Console(stderr=True, highlight=False), transient=transient)
        with bars.bar:
            yield bars
    else:
        lines = LineReporter(command)
        yield lines
        lines.close()
