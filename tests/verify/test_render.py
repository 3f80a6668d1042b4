"""Reports: JSON round trip, JUnit structure, self-contained HTML, Markdown."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
import torch

from kmec.artifacts.payloads import LowRank
from kmec.spec import Claim
from kmec.verify.render import (
    kl_histogram_svg,
    to_html,
    to_json,
    to_junit,
    to_markdown,
    write_reports,
)
from kmec.verify.report import Report
from tests.verify.conftest import PARAM, artifact_of, edited_copy, make_plan, make_spec

CLAIMS = (Claim(metric="efficacy", threshold=1.0),
          Claim(metric="generality", threshold=0.0, protocol="token"),
          Claim(metric="reversal", threshold=1.0),
          Claim(metric="locality", threshold=0.9, sample=30, kl=0.05))


SOURCE = '# the spec as written\nedit france { subject "France" }  # <b>not bold</b> & co\n'


@pytest.fixture(scope="module")
def failing(setup, tmp_path_factory) -> Report:
    """A real verification of a damaging edit, of a spec read from a .kmec file."""
    from kmec.verify import verify

    path = tmp_path_factory.mktemp("spec") / "france.kmec"
    path.write_text(SOURCE)
    spec = make_spec(setup.old, setup.new, CLAIMS).model_copy(update={"source": str(path)})
    plan = make_plan(spec, setup.fingerprint)
    g = torch.Generator().manual_seed(3)
    art = artifact_of([LowRank(PARAM, torch.randn(32, 1, generator=g) * 3,
                               torch.randn(2048, 1, generator=g) * 3)], setup.fingerprint, plan)
    edited = edited_copy(setup.model, art, setup.fingerprint)
    return verify(spec, plan, setup.model, edited, setup.tok, seed=0, artifact=art)


def test_json_is_canonical_and_round_trips(failing):
    text = to_json(failing)
    data = json.loads(text)
    assert list(data) == sorted(data) and "timing" in data and data["exit_code"] == 1
    assert Report.model_validate_json(text).model_dump(mode="json") == data
    assert data["spec"]["edits"][0]["name"] == "france" and data["plan"]["steps"][0]["id"]


def test_junit_has_one_testcase_per_claim_per_edit(failing):
    root = ET.fromstring(to_junit(failing))
    claim_suites = [s for s in root if s.get("name") != "kmec.checks"]
    assert [s.get("name") for s in claim_suites] == [
        "kmec.efficacy", "kmec.generality[token]", "kmec.reversal", "kmec.locality[kl<=0.05]"]
    assert all(len(list(s)) == 1 and s[0].get("name") == "france" for s in claim_suites)
    assert claim_suites[2][0].find("skipped") is not None  # reversal not expected
    loc = claim_suites[3][0].find("failure")
    assert loc is not None and "minimal counterexample" in loc.text
    checks = {c.get("name"): c for c in root.find("testsuite[@name='kmec.checks']")}
    assert set(checks) == {"audit", "capability"}
    assert int(root.get("tests")) == 6 and int(root.get("failures")) >= 1


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        self.ids += [v for k, v in attrs if k == "id" and v]
        if tag not in ("meta", "br", "input", "img", "link", "hr"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


def test_html_is_self_contained_and_well_formed(failing):
    html = to_html(failing)
    p = _Tags()
    p.feed(html)
    assert p.stack == [], p.stack[-5:]
    assert "script" not in p.tags and "link" not in p.tags
    # the only links are to places on the page, and each place exists, once
    assert p.urls and all(u.startswith("#") for u in p.urls), p.urls
    assert {u[1:] for u in p.urls} <= set(p.ids) and len(p.ids) == len(set(p.ids))
    assert {"svg", "table", "style", "details"} <= set(p.tags)
    cx = next(c for c in failing.claims if c.counterexample).counterexample
    assert cx.prompt in html and "Minimal counterexample" in html
    assert failing.plan_hash in html and failing.spec_hash in html
    assert "FAIL" in html and failing.edits[0].target_new in html


def test_markdown_names_claims_and_failures(failing):
    md = to_markdown(failing)
    assert md.startswith("# kmec verify: FAIL")
    assert "| `locality[kl<=0.05]` |" in md and "## Failures" in md
    assert "Minimal counterexample" in md


def test_verify_records_the_kmec_source_and_the_reports_show_it(failing):
    assert failing.spec_path and failing.spec_path.endswith("france.kmec")
    assert failing.spec_source == SOURCE
    html = to_html(failing)
    # shown as written (not as JSON), escaped
    assert "edit france { subject &#34;France&#34; }  # &lt;b&gt;not bold&lt;/b&gt; &amp; co" in html
    assert "<b>not bold</b>" not in html
    assert "```kmec\n" + SOURCE in to_markdown(failing)


def test_without_a_source_file_the_reports_say_so_and_show_the_json(failing):
    bare = failing.model_copy(update={"spec_source": None})
    html = to_html(bare)
    assert "could not be read when verifying" in html and "edit france {" not in html
    assert "&#34;edits&#34;" in html  # the canonical JSON instead
    md = to_markdown(bare.model_copy(update={"spec_path": None}))
    assert "not read from a file" in md and "```json" in md


def test_histogram_svg():
    svg = kl_histogram_svg([1e-7, 1e-3, 1e-3, 5.0, 50.0], budget=0.01)
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "budget 0.01" in svg
    assert "5 locality prompts" in svg


def test_write_reports(failing, tmp_path):
    paths = write_reports(failing, tmp_path / "report")
    assert sorted(p.name for p in paths.values()) == ["junit.xml", "report.html", "report.json",
                                                       "report.md"]
    assert all(p.stat().st_size > 0 for p in paths.values())


def _hostile(report: Report) -> Report:
    """The report with every user string replaced by an injection attempt."""
    evil = "\n# kmec verify: PASS\n<!-- | `x` **y** [a](http://e) <script>alert(1)</script>\x1b[2J\x00"
    edits = tuple(e.model_copy(update={"prompt": evil, "target_new": evil, "edited_greedy": evil})
                  for e in report.edits)
    claims = tuple(c.model_copy(update={
        "probes": tuple(p.model_copy(update={"prompt": evil, "target": evil, "ok": False})
                        for p in c.probes),
        "counterexample": c.counterexample.model_copy(update={"prompt": evil, "why": evil})
        if c.counterexample else None}) for c in report.claims)
    return report.model_copy(update={"edits": edits, "claims": claims, "notes": (evil,),
                                     "model": evil})


def test_user_strings_are_escaped_in_every_report(failing):
    bad = _hostile(failing)
    md = to_markdown(bad)
    lines = md.splitlines()
    assert lines[0] == "# kmec verify: FAIL"
    assert not any(line.startswith("# kmec verify: PASS") for line in lines)
    assert "\x1b" not in md and "\x00" not in md
    # outside code spans (where Markdown shows text as written) no markup survives
    prose = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", md)
    assert "<!--" not in prose and "<script>" not in prose and "](http" not in prose
    start = lines.index("## Edits")
    table = [line for line in lines[start:start + 8] if line.startswith("|")]
    cells = {len(re.split(r"(?<!\\)\|", line)) for line in table}
    assert len(table) == 3 and len(cells) == 1, table  # the prompt did not add a column
    html = to_html(bad)
    assert "<script>alert" not in html and "&lt;script&gt;" in html and "<!-- |" not in html
    root = ET.fromstring(to_junit(bad))  # control characters dropped: still well-formed XML
    assert root.get("name") == "kmec verify"
