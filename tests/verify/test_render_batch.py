"""The report of a batch: reasons in words, each failing prompt and counterexample once,
one heat map instead of a table per edit, charts of P(new)/P(old) and claims vs thresholds.

Rendered from a hand-built twelve-edit report (tests/verify/render_fixtures.py): no model.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from kmec.verify.findings import (
    anchor,
    claim_reason,
    counterexamples,
    failing_prompts,
    heat_map,
    probe_reason,
)
from kmec.verify.render import md_fence, to_html, to_markdown
from kmec.verify.report import ClaimResult, ProbeResult, Side, TopToken
from tests.verify.render_fixtures import GREECE, SKY, SOURCE, batch_report


@pytest.fixture(scope="module")
def report():
    return batch_report()


@pytest.fixture(scope="module")
def html(report):
    return to_html(report)


def _side(top: str, **kw) -> Side:
    return Side(top=(TopToken(token=top, prob=0.5),), **kw)


def _claim(metric: str, protocol: str = "prob", **kw) -> ClaimResult:
    return ClaimResult(claim=metric, metric=metric, protocol=protocol, threshold=0.9,
                       declared=True, edit="e", status="fail", score=0.5, n=2, **kw)


def test_probe_reasons_are_stated_in_words():
    loc = _claim("locality", kl_budget=0.1)
    kl = ProbeResult(kind="neighbour", prompt="p", value=0.0, ok=False, base=_side(" Paris"),
                     edited=_side(" Paris", kl=0.34))
    assert probe_reason(kl, loc) == "KL 0.34 over the budget 0.1"
    top1 = kl.model_copy(update={"edited": _side(" Rome", kl=0.01)})
    assert probe_reason(top1, loc) == "top-1 is ' Rome', not ' Paris' as before the edit"
    new = ProbeResult(kind="efficacy", prompt="p", target=" Rome", old=" Paris", value=0.0,
                      ok=False, base=_side(" Paris"),
                      edited=_side(" Paris", p_target=0.12, p_old=0.4))
    assert probe_reason(new, _claim("efficacy")) == "P(new ' Rome') 0.12 not above P(old ' Paris') 0.4"
    no_old = new.model_copy(update={"old": None})
    assert probe_reason(no_old, _claim("efficacy")) == "top-1 is ' Paris', not the first token of ' Rome'"
    token = new.model_copy(update={"value": 0.5})
    assert probe_reason(token, _claim("generality", "token")) == "token accuracy 0.50 below 0.9 on ' Rome'"
    assert probe_reason(new, _claim("efficacy", "greedy")) == "greedy decoding does not give ' Rome'"
    assert probe_reason(new.model_copy(update={"ok": True}), _claim("efficacy")) == ""


def test_claim_reason_counts_what_failed(report):
    germany = next(c for c in report.claims if c.edit == "germany" and c.metric == "locality")
    assert claim_reason(germany) == ("locality 0.955 below the threshold 0.96 (1 of 22 prompts "
                                     "failed: 1 KL over the budget 0.1)")
    canada = next(c for c in report.claims if c.edit == "canada" and c.metric == "locality")
    assert claim_reason(canada).endswith("(1 of 22 prompts failed: 1 top-1 change)")
    assert claim_reason(next(c for c in report.claims if c.status == "pass")) == ""


def test_failing_prompts_are_deduplicated_across_the_batch(report, html):
    found = {(f.claim, f.prompt): f for f in failing_prompts(report)}
    greece = found[("locality[kl<=0.1]", GREECE)]
    assert [e[0] for e in greece.edits] == ["germany", "spain", "japan"]
    assert all(why == "KL 0.34 over the budget 0.1" for _, why, _ in greece.edits)
    assert [e[0] for e in found[("locality[kl<=0.1]", SKY)].edits] == ["canada", "brazil"]
    # the batch table lists each failing prompt once, linking every edit it failed on
    table = html[html.index('id="failing-prompts"'):html.index('id="counterexamples"')]
    assert table.count(f"<td>{GREECE} ") == 1 and table.count(f"<td>{SKY} ") == 1
    row = next(r for r in table.split("<tr>") if GREECE in r)
    assert all(f'href="#{anchor("locality[kl<=0.1]", e)}"' in row
               for e in ("germany", "spain", "japan"))


def test_counterexamples_are_shown_once_with_their_edits(report, html):
    shared = counterexamples(report)
    assert [(x.prompt, [e[0] for e in x.edits]) for x in shared] == [
        (GREECE, ["germany", "spain", "japan"]), (SKY, ["canada", "brazil"])]
    section = html[html.index('id="counterexamples"'):html.index('id="locality"')]
    assert section.count("<tr id=\"cx-") == 2 and section.count(GREECE) == 1
    md = to_markdown(report)
    part = md[md.index("## Minimal counterexamples"):]
    assert part.count(GREECE) == 1 and "found for germany, spain, japan" in part


def test_failing_scores_link_to_their_stated_reason(report, html):
    for c in report.failures():
        a = anchor(c.claim, c.edit)
        assert html.count(f'id="{a}"') == 1
        # the claims table cell links there, and the target states the reason in words
        cell = re.search(rf'<td class="num fail"[^>]*><a href="#{a}">', html)
        assert cell, (c.claim, c.edit)
        target = html[html.index(f'id="{a}"'):]
        assert claim_reason(c) in target[:target.index("</summary>")]
    assert "KL 0.34 over the budget 0.1" in html
    assert "top-1 is &#39; blue&#39;, not &#39; the&#39; as before the edit" in html


class _Sections(HTMLParser):
    """Tables outside any <details> (what a reader sees without clicking)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.open_tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "details":
            self.depth += 1
        elif tag == "table" and self.depth == 0:
            self.open_tables += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth -= 1


def test_one_heat_map_replaces_the_per_edit_locality_tables(report, html):
    hm = heat_map(report)
    assert hm is not None and hm.edits == [e.name for e in report.edits]
    assert hm.prompts[:2] == [SKY, GREECE]  # top-1 changes first, then KL over the budget
    assert hm.per_edit["germany"] == (1, 22) and hm.per_edit["france"] == (0, 22)
    assert html.count('aria-label="locality heat map') == 1
    drawn = len(re.findall(r'<rect class="mark cell"', html))
    assert drawn == sum((e, p) in hm.cells for e in hm.edits for p in hm.prompts)
    assert drawn >= 12 * 20  # every edit's checked prompts among the columns
    # the detail is still there, per edit, but collapsed
    loc = html[html.index('id="locality"'):html.index('id="capability"')]
    assert loc.count("disagree</summary>") == 12
    p = _Sections()
    p.feed(loc)
    assert p.open_tables == 0


def test_heat_map_columns_are_capped_at_the_worst_prompts(report):
    hm = heat_map(report, columns=5)
    assert hm is not None and len(hm.prompts) == 5 and hm.total == 24
    assert hm.prompts[:2] == [SKY, GREECE]


def test_probability_chart_has_a_before_after_mark_per_edit(report, html):
    chart = html[html.index('aria-label="P(new) and P(old)'):]
    chart = chart[:chart.index("</svg>")]
    assert chart.count('class="mark new"') == 12 and chart.count('class="mark old"') == 12
    # france: P(new) 0.002 -> 0.12 is drawn from left towards the right, below P(old) after
    assert "france: P(&#39; City0&#39;) 0.002 → 0.12" in chart
    m = re.search(r'class="mark new"><title>france[^<]*</title><line x1="([\d.]+)"[^>]*'
                  r'x2="([\d.]+)"', chart)
    assert m and float(m.group(1)) < float(m.group(2))


def test_claim_chart_marks_thresholds_and_labels_declared_and_heldout(html):
    chart = html[html.index('aria-label="claim scores'):]
    chart = chart[:chart.index("</svg>")]
    assert chart.count('class="mark threshold"') == 3
    assert "declared (24 prompts)" in chart and "held out (240 prompts)" in chart
    assert chart.count('class="mark dot"') == 36  # a dot per claim per edit
    assert chart.count('fill="#c0392b" stroke="#fff"><title>') == 7  # the failing ones


def test_markdown_states_reasons_deduplicated_prompts_and_the_source(report):
    md = to_markdown(report)
    assert "- `locality[kl<=0.1]` on `germany`: locality 0.955 below the threshold 0.96" in md
    assert md.count(f"| `{GREECE}` |") == 1
    assert "| germany, spain, japan |" in md
    assert md_fence(SOURCE, "kmec") in md and "<script>alert" in SOURCE
    fenced = md[md.index("````kmec") if "````kmec" in md else md.index("```kmec"):]
    assert "<script>alert(1)</script>" in fenced.split("\n```")[0]  # only inside the fence


def test_md_fence_outlasts_backticks():
    assert md_fence("a ```` b").startswith("`````\n") and md_fence("x").startswith("```\n")


def test_page_source_is_escaped(html):
    assert "<script>" not in html
    assert "# a comment with markup: &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;/pre&gt;" in html


@pytest.mark.parametrize("name", ["kmec.verify.findings", "kmec.verify.render",
                                  "kmec.verify.charts"])
def test_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
