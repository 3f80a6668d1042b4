"""Render a Report: JSON, JUnit XML, Markdown and self-contained HTML.

Contents:
    to_json()          canonical JSON (sorted keys; timing under "timing")
    to_junit()         JUnit XML: one testcase per claim per edit, plus audit and canaries
    to_markdown()      Markdown (templates/report.md.j2)
    to_html()          one HTML file, inline CSS and SVG, no external assets
    kl_histogram_svg() inline SVG histogram of locality KL over the sampled prompts
    write_reports()    all four into a folder (report.json, junit.xml, report.md, report.html)
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from kmec.hashing import atomic_write_text, canonical_json
from kmec.outputs import OutputError
from kmec.verify.report import Report


class _MdRaw(str):
    """Markdown the template itself built (a code span): :func:`md_escape` leaves it as is."""


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+!|~-])")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def md_escape(value: Any) -> str:
    """A value as inert Markdown text: HTML special characters become entities,
    Markdown punctuation is backslash-escaped, line breaks become ``↵``.

    Every value a report template prints goes through it (jinja2's
    ``finalize``), so a prompt cannot add a heading (``# kmec verify: PASS``),
    open an HTML comment that hides the rest, or break a table.

    >>> md_escape("# PASS <!-- x")
    '\\# PASS &lt;!\\-\\- x'
    """
    if isinstance(value, _MdRaw):
        return str(value)
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ↵ ")
    return _MD_SPECIAL.sub(r"\\\1", _XML_INVALID.sub("", text))


def md_code(value: Any) -> _MdRaw:
    """A value as a Markdown code span that no backtick, pipe or line break can end early."""
    text = _XML_INVALID.sub("", str(value)).replace("\r", " ").replace("\n", " ↵ ")
    text = text.replace("|", "\\|")  # GitHub tables split cells on | even inside code
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return _MdRaw(f"{fence}{pad}{text}{pad}{fence}")


def xml_text(value: Any) -> str:
    """Text XML 1.0 can hold (control characters other than tab and newlines dropped)."""
    return _XML_INVALID.sub("", str(value))


def _filters(env: jinja2.Environment) -> jinja2.Environment:
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    env.filters["g"] = lambda v: "–" if v is None else f"{v:.3g}"
    env.filters["code"] = md_code
    return env


_ENV = _filters(jinja2.Environment(
    loader=jinja2.PackageLoader("kmec.verify", "templates"),
    autoescape=jinja2.select_autoescape(["html", "html.j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
))
# Markdown: every printed value is escaped (finalize), code spans built with `| code`
_MD_ENV = _filters(jinja2.Environment(
    loader=jinja2.PackageLoader("kmec.verify", "templates"),
    autoescape=False,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    finalize=md_escape,
))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def to_json(report: Report) -> str:
    """Canonical JSON; identical runs differ only under ``"timing"``."""
    return canonical_json(_finite(report.model_dump(mode="json")))


def to_junit(report: Report) -> str:
    """JUnit XML: a suite per claim (a testcase per edit), ``audit`` and ``capability``."""
    root = ET.Element("testsuites", name="kmec verify")
    suites: dict[str, ET.Element] = {}
    for r in report.claims:
        suite = suites.get(r.claim)
        if suite is None:
            suite = suites[r.claim] = ET.SubElement(root, "testsuite",
                                                    name=xml_text(f"kmec.{r.claim}"))
        case = ET.SubElement(suite, "testcase", classname=xml_text(f"kmec.{r.claim}"),
                             name=xml_text(r.edit))
        if r.status == "n/a":
            ET.SubElement(case, "skipped", message=xml_text(r.note))
        elif r.status == "fail":
            f = ET.SubElement(case, "failure",
                              message=xml_text(f"{r.claim} = {r.score} < {r.threshold:g}"),
                              type="ClaimViolated")
            lines = [f"{p.kind}: {p.prompt!r} value {p.value}" for p in r.probes if not p.ok][:20]
            if r.counterexample is not None:
                c = r.counterexample
                lines.insert(0, f"minimal counterexample ({c.source}): {c.prompt!r}: {c.why}")
            f.text = xml_text("\n".join(lines))
    extra = ET.SubElement(root, "testsuite", name="kmec.checks")
    case = ET.SubElement(extra, "testcase", classname="kmec.checks", name="audit")
    if not report.audit.ran:
        ET.SubElement(case, "skipped", message=xml_text(report.audit.summary))
    elif not report.audit.ok:
        ET.SubElement(case, "failure", message=xml_text(report.audit.summary),
                      type="AuditFailed")
    case = ET.SubElement(extra, "testcase", classname="kmec.checks", name="capability")
    if not report.capability.ran:
        ET.SubElement(case, "skipped", message="no locality claim")
    elif not report.capability.ok:
        ET.SubElement(case, "failure", message=f"perplexity ratio {report.capability.ppl_ratio}, "
                      f"questions kept {report.capability.questions_survived}",
                      type="CapabilityLost")
    for suite in root:
        cases = list(suite)
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
        suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    root.set("tests", str(sum(int(s.get("tests", 0)) for s in root)))
    root.set("failures", str(sum(int(s.get("failures", 0)) for s in root)))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _log_bins(values: Sequence[float], lo: float = 1e-6, hi: float = 10.0, n: int = 21) -> list[int]:
    counts = [0] * n
    a, b = math.log10(lo), math.log10(hi)
    for v in values:
        x = math.log10(min(max(v, lo), hi))
        counts[min(int((x - a) / (b - a) * n), n - 1)] += 1
    return counts


def kl_histogram_svg(values: Sequence[float], budget: float | None = None, *,
                     width: int = 560, height: int = 180) -> str:
    """An inline SVG histogram of KL values on a log scale (1e-6 … 10 nats)."""
    n, pad, axis = 21, 36, 36
    counts = _log_bins(values, n=n)
    top = max(counts) or 1
    plot_w, plot_h = width - 2 * pad, height - axis - 16
    bar_w = plot_w / n
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of locality KL">'),
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        x = pad + i * bar_w
        parts.append(f'<rect x="{x + 1:.1f}" y="{16 + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
                     f'height="{h:.1f}" fill="#4a78b5"><title>{c} prompt(s)</title></rect>')
        if c:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{12 + plot_h - h:.1f}" font-size="9" '
                         f'text-anchor="middle">{c}</text>')
    base = 16 + plot_h
    parts.append(f'<line x1="{pad}" y1="{base}" x2="{width - pad}" y2="{base}" stroke="#333"/>')
    for k, e in enumerate(range(-6, 2)):
        x = pad + plot_w * k / 7
        parts.append(f'<text x="{x:.1f}" y="{base + 14}" font-size="10" text-anchor="middle">'
                     f'1e{e}</text>')
    if budget is not None and budget > 0:
        x = pad + plot_w * (math.log10(min(max(budget, 1e-6), 10)) + 6) / 7
        parts.append(f'<line x1="{x:.1f}" y1="12" x2="{x:.1f}" y2="{base}" stroke="#c0392b" '
                     f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="22" font-size="10" '
                     f'fill="#c0392b">budget {escape(f"{budget:g}")}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 2}" font-size="10" text-anchor="middle">'
                 f'KL(base ‖ edited) in nats, {len(values)} locality prompts</text></svg>')
    return "".join(parts)


def _context(report: Report) -> dict[str, Any]:
    loc = [r for r in report.claims if r.metric == "locality"]
    kls = [p.edited.kl for r in loc for p in r.probes if p.edited.kl is not None]
    budgets = [r.kl_budget for r in loc if r.kl_budget is not None]
    labels = list(dict.fromkeys(r.claim for r in report.claims))
    matrix = {(r.claim, r.edit): r for r in report.claims}
    return {"r": report, "labels": labels, "matrix": matrix,
            "failures": [c for c in report.claims if c.status == "fail"],
            "histogram": Markup(kl_histogram_svg(kls, min(budgets) if budgets else None)),
            "n_kl": len(kls)}


def to_markdown(report: Report) -> str:
    """The report as Markdown (for CI summaries and code review)."""
    return _MD_ENV.get_template("report.md.j2").render(**_context(report))


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG)."""
    ctx = _context(report)
    ctx["spec_json"] = canonical_json(report.spec)
    ctx["plan_json"] = canonical_json(report.plan) if report.plan else ""
    return _ENV.get_template("report.html.j2").render(**ctx)


def write_reports(report: Report, folder: str | Path) -> dict[str, Path]:
    """Write report.json, junit.xml, report.md and report.html (atomically each)."""
    folder = Path(folder)
    out = {"json": folder / "report.json", "junit": folder / "junit.xml",
           "markdown": folder / "report.md", "html": folder / "report.html"}
    texts = {"json": to_json(report), "junit": to_junit(report),
             "markdown": to_markdown(report), "html": to_html(report)}
    try:
        for key, text in texts.items():
            atomic_write_text(out[key], text)
    except OSError as e:
        raise OutputError(f"cannot write the reports to {folder}: {e.strerror or e}",
                          hint="choose a folder you can write to (--report-dir)") from None
    return out
