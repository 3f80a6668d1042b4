"""A short Markdown summary of a verification for a CI job page (``$GITHUB_STEP_SUMMARY``).

Contents:
    STEP_SUMMARY_ENV     the variable GitHub Actions sets to the job's summary file
    claims_table()       one row per claim: metric, threshold, score, declared, held out, result
    verify_summary()     ``kmec verify``: verdict, the claims (failing first), the failures, the reports
    compile_summary()    ``kmec compile``: the same for the build compile wrote, plus its attempts
    append_step_summary() append Markdown to ``$GITHUB_STEP_SUMMARY`` when it is set

The summary is a digest: the full evidence stays in report.html and junit.xml,
which it names. Every value taken from a report (claim labels, edit names,
notes) is written as inert text, so a prompt cannot add a heading or break the
table. Steps of one job share the summary file, so it is appended to, never
replaced; a file that cannot be written is a warning, never a failed command.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from kmec.verify.report import ClaimResult, Report

log = logging.getLogger("kmec")

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
MAX_FAILURES = 20  # failing (claim, edit) rows listed by name; the rest are counted

_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+!|~<>-])")


def _text(value: object) -> str:
    """``value`` as one line of inert Markdown (punctuation escaped, line breaks shown).

    >>> _text("# a | b\\nc")
    '\\\\# a \\\\| b ↵ c'
    """
    flat = str(value).replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ↵ ")
    return _SPECIAL.sub(r"\\\1", flat.replace("&", "&amp;"))


def _code(value: object) -> str:
    """``value`` as a Markdown code span on one line (no backtick or pipe can end it early).

    >>> print(_code("build/`x`|y"))
    `build/'x'\\|y`
    """
    flat = " ".join(str(value).split()).replace("`", "'").replace("|", "\\|")
    return f"`{flat}`"


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _rows_by_claim(report: Report) -> dict[str, list[ClaimResult]]:
    rows: dict[str, list[ClaimResult]] = {}
    for r in report.claims:
        rows.setdefault(r.claim, []).append(r)
    return rows


def claims_table(report: Report) -> list[str]:
    """The claims as Markdown table lines, failing claims first (then in spec order).

    Score is the mean over edits; declared and held out are the same metric on the
    prompts the compiler was shown and on those it never saw; the audit and the
    capability canaries close the table when they ran.
    """
    lines = ["| claim | metric | threshold | score | declared | held out | result |",
             "|---|---|---:|---:|---:|---:|---|"]
    by_claim = _rows_by_claim(report)
    order = sorted(by_claim, key=lambda c: not any(r.status == "fail" for r in by_claim[c]))
    for label in order:
        rows = by_claim[label]
        failing = sum(r.status == "fail" for r in rows)
        scored = sum(r.status != "n/a" for r in rows)
        split = report.aggregate.split.get(label)
        result = (f"**FAIL** ({failing} of {scored} edits)" if failing else
                  f"pass ({scored} edits)" if scored else "n/a")
        lines.append(f"| {_text(label)} | {_text(rows[0].metric)} | {rows[0].threshold:g} | "
                     f"{_score(report.aggregate.means.get(label))} | "
                     f"{_score(split.declared if split else None)} | "
                     f"{_score(split.heldout if split else None)} | {result} |")
    audit, cap = report.audit, report.capability
    if audit.ran:
        lines.append(f"| audit | only declared weights moved | | | | | "
                     f"{'pass' if audit.ok else '**FAIL**'} |")
    if cap.ran:
        lines.append(f"| capability | perplexity and questions | | "
                     f"{_score(cap.ppl_ratio)} | | | {'pass' if cap.ok else '**FAIL**'} |")
    return lines


def _failures(report: Report) -> list[str]:
    failing = report.failures()
    lines = [f"- {_text(r.claim)} on {_code(r.edit)}: {_score(r.score)} < {r.threshold:g}"
             + (f" ({_text(r.note)})" if r.note else "") for r in failing[:MAX_FAILURES]]
    if len(failing) > MAX_FAILURES:
        lines.append(f"- … and {len(failing) - MAX_FAILURES} more (see the reports)")
    if report.audit.ran and not report.audit.ok:
        lines.append(f"- audit: {_text(report.audit.summary)}")
    return lines


def _reports(folder: str | Path | None) -> list[str]:
    if folder is None:
        return []
    f = Path(folder)
    return ["", "Reports: " + ", ".join(_code(f / n) for n in
                                        ("report.html", "junit.xml", "report.md", "report.json"))]


def verify_summary(report: Report, *, target: str | Path, report_dir: str | Path | None
                   ) -> str:
    """``kmec verify``'s summary: verdict, claims table, failures, where the reports are."""
    verdict = "PASS" if report.ok else "FAIL"
    lines = [f"### kmec verify {_code(target)}: {verdict}", "",
             f"{_text(report.summary)} (model {_text(report.model)}, exit {report.exit_code})", ""]
    lines += claims_table(report)
    failures = _failures(report)
    if failures:
        lines += ["", "Failing:", *failures]
    lines += _reports(report_dir)
    return "\n".join(lines) + "\n\n"


def compile_summary(*, spec: str | Path, out: str | Path, claims_ok: bool | None,
                    report: Report | None, attempts: Sequence[str] = (), verdict: str = "",
                    up_to_date: bool = False) -> str:
    """``kmec compile``'s summary: the build's verdict, its attempts and its claims.

    Args:
        spec, out: the spec compiled and the build directory written.
        claims_ok: whether every claim held on the build (None: claims not scored).
        report: the scoring of the build's attempt (None: up to date, or not scored).
        attempts: one line per attempt (:meth:`kmec.pipeline.Attempt.line`).
        verdict: what failed and the trade-offs seen (empty when the claims hold).
        up_to_date: the build was already up to date and nothing ran.
    """
    state = {None: "built (claims not scored)", True: "claims hold",
             False: "claims FAIL"}[claims_ok]
    lines = [f"### kmec compile {_code(spec)}: {state}", "",
             f"Build: {_code(out)}" + (" (up to date, nothing ran)" if up_to_date else "")]
    if attempts:
        lines += ["", f"{len(attempts)} attempt(s):", *(f"- {_text(a)}" for a in attempts)]
    if verdict:
        lines += ["", *(f"> {_text(v)}" for v in verdict.splitlines())]
    if report is not None:
        lines += ["", *claims_table(report)]
        failures = _failures(report)
        if failures:
            lines += ["", "Failing:", *failures]
    lines += ["", f"Reports: run {_code(f'kmec verify {out}')} for report.html and junit.xml."]
    return "\n".join(lines) + "\n\n"


def append_step_summary(markdown: str, env: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to the file ``$GITHUB_STEP_SUMMARY`` names, when it is set.

    Returns:
        The file written, or None (the variable is unset or empty, or the write failed:
        a warning is logged, the command's result stands).
    """
    name = (os.environ if env is None else env).get(STEP_SUMMARY_ENV, "")
    if not name:
        return None
    path = Path(name)
    try:
        with path.open("a", encoding="utf-8") as f:  # other steps' summaries stay
            f.write(markdown)
    except OSError as e:
        log.warning("cannot write the step summary to %s (%s); the result stands",
                    path, e.strerror or e)
        return None
    return path
