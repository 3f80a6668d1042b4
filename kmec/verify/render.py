"""Render a Report: JSON, JUnit XML, Markdown and self-contained HTML.

Contents:
    to_json()          canonical JSON (sorted keys; timing under "timing")
    to_junit()         JUnit XML: one testcase per claim per edit, plus audit and canaries
    to_markdown()      Markdown (templates/report.md.j2): failure reasons, deduplicated
                       counterexamples and failing prompts, the .kmec source
    to_html()          one HTML file, inline CSS and SVG charts (kmec.verify.charts), no
                       script or external asset: claims against thresholds, P(new)/P(old)
                       before -> after, the edits x neighbours heat map, failures linked to
                       their reasons, the .kmec source
    kl_histogram_svg() inline SVG histogram of locality KL (from :mod:`kmec.verify.charts`)
    write_reports()    all four into a folder (report.json, junit.xml, report.md, report.html)
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from kmec.hashing import atomic_write_text, canonical_json
from kmec.outputs import OutputError
from kmec.verify.charts import claim_chart_svg, heatmap_svg, kl_histogram_svg, prob_chart_svg
from kmec.verify.findings import (
    anchor,
    claim_reason,
    counterexamples,
    failing_prompts,
    heat_map,
    probe_reason,
)
from kmec.verify.report import Report


class _MdRaw(str):
    """Markdown the template itself built (a code span): :func:`md_escape` leaves it as is."""


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+!|~-])")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def md_escape(value: Any) -> str:
    r"""A value as inert Markdown text: HTML special characters become entities,
    Markdown punctuation is backslash-escaped, line breaks become ``↵``.

    Every value a report template prints goes through it (jinja2's
    ``finalize``), so a prompt cannot add a heading (``# kmec verify: PASS``),
    open an HTML comment that hides the rest, or break a table.

    >>> md_escape("# PASS <!-- x")
    '\\# PASS &lt;\\!\\-\\- x'
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


def md_fence(value: Any, lang: str = "") -> _MdRaw:
    """A value as a fenced Markdown code block that no backtick run inside it can close.

    >>> print(md_fence("a ``` b", "kmec"))
    ````kmec
    a ``` b
    ````
    """
    text = _XML_INVALID.sub("", str(value)).replace("\r\n", "\n").replace("\r", "\n")
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return _MdRaw(f"{fence}{lang}\n{text.rstrip(chr(10))}\n{fence}")


def xml_text(value: Any) -> str:
    """Text XML 1.0 can hold (control characters other than tab and newlines dropped)."""
    return _XML_INVALID.sub("", str(value))


def _filters(env: jinja2.Environment) -> jinja2.Environment:
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    env.filters["g"] = lambda v: "–" if v is None else f"{v:.3g}"
    env.filters["code"] = md_code
    env.filters["fence"] = md_fence
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


def _context(report: Report) -> dict[str, Any]:
    loc = [r for r in report.claims if r.metric == "locality"]
    kls = [p.edited.kl for r in loc for p in r.probes if p.edited.kl is not None]
    budgets = [r.kl_budget for r in loc if r.kl_budget is not None]
    labels = list(dict.fromkeys(r.claim for r in report.claims))
    matrix = {(r.claim, r.edit): r for r in report.claims}
    failures = list(report.failures())
    examples = counterexamples(report)
    return {"r": report, "labels": labels, "matrix": matrix, "failures": failures,
            "reasons": {(c.claim, c.edit): claim_reason(c) for c in failures},
            "probe_reason": probe_reason, "anchor": anchor,
            "failing": failing_prompts(report), "examples": examples,
            "example_of": {x.prompt: i for i, x in enumerate(examples, 1)},
            "histogram": Markup(kl_histogram_svg(kls, min(budgets) if budgets else None)),
            "n_kl": len(kls), "source": report.spec_source,
            "source_path": report.spec_path or "", "spec_json": canonical_json(report.spec)}


def to_markdown(report: Report) -> str:
    """The report as Markdown (for CI summaries and code review)."""
    return _MD_ENV.get_template("report.md.j2").render(**_context(report))


def _locality_rows(report: Report, keep: int = 25) -> list[tuple[str, list[Any], int, int]]:
    """Per locality claim and edit, its probes for the collapsed detail: the disagreeing
    ones, then the largest KL, ``keep`` at most; how many were checked and disagree."""
    out = []
    for c in report.claims:
        if c.metric != "locality" or not c.probes:
            continue
        ranked = sorted(c.probes, key=lambda p: (p.ok, -(p.edited.kl or 0.0)))
        out.append((c.edit, [(p, probe_reason(p, c)) for p in ranked[:keep]], len(c.probes),
                    sum(not p.ok for p in c.probes)))
    return out


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG)."""
    ctx = _context(report)
    heat = heat_map(report)
    ctx["heatmap"] = Markup(heatmap_svg(heat)) if heat else None
    ctx["heat"] = heat
    ctx["probs"] = Markup(prob_chart_svg(report.edits)) if report.edits else None
    ctx["claim_chart"] = Markup(claim_chart_svg(report)) if report.claims else None
    ctx["locality_rows"] = _locality_rows(report)
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
