"""Errors raised by kmec.

Contents:
    Span              a source location (file, line, col, end_line, end_col)
    KmecError         root of every error kmec raises on purpose
    SpecError         a spec that does not parse or check (carries diagnostics)
    PlanError         a spec the planner cannot satisfy
    BackendError      a plan step that failed while executing (carries step id)
    ArtifactError     a missing, corrupt or mismatched artifact
    ModelError        a model reference that cannot be resolved or loaded
    StatsError        statistics that cannot be computed or read
    VerifyError       verification that cannot run (bad build dir, ...)
    did_you_mean()    "did you mean ...?" suggestions for unknown names
    render_with_caret()  a source line with a caret under a span

Every error has a message that says what is wrong and, where there is one,
what to do next (``hint``). The CLI prints ``str(error)`` and exits with code
2; it never shows a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict


class Span(BaseModel):
    """A location in a source file; lines and columns are 1-based."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = "<string>"
    line: int = 1
    col: int = 1
    end_line: int = 1
    end_col: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class KmecError(Exception):
    """Root of every error kmec raises on purpose.

    Args:
        message: what is wrong, in one sentence.
        hint: what the user can do about it (optional).
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


@dataclass(frozen=True)
class Diagnostic:
    """One located problem in a spec: ``file:line:col: error: message``."""

    span: Span
    message: str
    hint: str | None = None
    severity: str = "error"
    source_line: str | None = field(default=None, compare=False)

    def render(self) -> str:
        head = f"{self.span}: {self.severity}: {printable(self.message)}"
        parts = [head]
        if self.source_line is not None:
            parts.append(render_with_caret(self.source_line, self.span))
        if self.hint:
            parts.append(f"  hint: {printable(self.hint)}")
        return "\n".join(parts)


class SpecError(KmecError):
    """A spec that does not parse or fails its semantic checks.

    Carries every diagnostic found (errors are collected, not raised one by one).
    """

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        if not diagnostics:
            raise ValueError("SpecError needs at least one diagnostic")
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    @property
    def span(self) -> Span:
        return self.diagnostics[0].span

    def __str__(self) -> str:
        return self.message


class PlanError(KmecError):
    """The planner cannot produce a plan that satisfies the spec."""


class BackendError(KmecError):
    """A plan step failed while executing."""

    def __init__(self, message: str, *, step_id: str, hint: str | None = None) -> None:
        super().__init__(f"step {step_id}: {message}", hint=hint)
        self.step_id = step_id


class ArtifactError(KmecError):
    """An artifact is missing, corrupt, or made for another base model."""


class ModelError(KmecError):
    """A model reference cannot be resolved or loaded."""


class StatsError(KmecError):
    """Key statistics cannot be computed or read."""


class VerifyError(KmecError):
    """Verification cannot run (as opposed to a claim that fails)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """Suggest the closest candidate to ``name``.

    >>> did_you_mean("captial", ["capital", "currency"])
    "did you mean 'capital'?"
    >>> did_you_mean("zzz", ["capital"]) is None
    True
    """
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters shown as ``�``, one for one (carets stay aligned):
    a spec cannot send escape sequences to the terminal or CI log that shows its errors.

    >>> printable("red \x1b[31m")
    'red �[31m'
    """
    return _CONTROL.sub("\ufffd", text)


def render_with_caret(source_line: str, span: Span) -> str:
    """Render a source line with carets under the span's columns.

    >>> print(render_with_caret('edit x {', Span(line=1, col=6, end_line=1, end_col=7)))
        edit x {
             ^
    """
    line = printable(source_line.rstrip("\n").expandtabs(1))
    start = max(span.col - 1, 0)
    if span.end_line == span.line and span.end_col > span.col:
        width = span.end_col - span.col
    else:
        width = 1
    width = max(1, min(width, max(len(line) - start, 1)))
    return f"    {line}\n    {' ' * start}{'^' * width}"
