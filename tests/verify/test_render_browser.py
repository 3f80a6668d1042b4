"""The HTML report in a real browser: headless Chromium lays the page out and draws the charts.

The report has no script of its own; the test adds one to a copy of the page that measures,
after layout, each chart's box, whether it is shown and the boxes of its marks
(``class="mark ..."``), and the page height, and writes them into the DOM that
``--dump-dom`` prints.

Chromium is a test requirement: ``scripts/setup.sh`` installs Debian's ``chromium`` when
it can (root, apt-get). Without a browser this test fails and says how to install one.
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kmec.verify.render import to_html
from tests.verify.render_fixtures import batch_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")

MEASURE = r"""<script>
window.addEventListener("load", () => {
  const box = (el) => { const r = el.getBoundingClientRect();
                        return [Math.round(r.width * 10) / 10, Math.round(r.height * 10) / 10]; };
  const charts = {};
  for (const svg of document.querySelectorAll("svg")) {
    const marks = {};
    for (const m of svg.querySelectorAll(".mark")) {
      const kind = m.getAttribute("class").trim().split(/\s+/).pop();
      (marks[kind] = marks[kind] || []).push(box(m));
    }
    charts[svg.getAttribute("aria-label")] = {box: box(svg), marks: marks,
                                              visible: svg.checkVisibility()};
  }
  const out = document.createElement("pre");
  out.id = "kmec-measure";
  out.textContent = JSON.stringify({height: document.documentElement.scrollHeight,
                                    charts: charts});
  document.body.appendChild(out);
});
</script>"""


def browser() -> str:
    """The Chromium to test with (``KMEC_CHROMIUM`` overrides); fails saying how to get one."""
    given = os.environ.get("KMEC_CHROMIUM")
    for name in ((given,) if given else BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no headless browser found for the report test (looked for "
                f"{given or ', '.join(BROWSERS)}). Install Chromium: `sudo apt-get install -y "
                "chromium` on Debian/Ubuntu (scripts/setup.sh does it when run as root), or "
                "set KMEC_CHROMIUM to a Chromium or Chrome binary.")


def render_in_browser(html: str, folder: Path, width: int = 1280) -> dict:
    """Lay ``html`` out in headless Chromium; what the measuring script found."""
    page = folder / "report.html"
    page.write_text(html.replace("</body>", MEASURE + "</body>"))
    cmd = [browser(), *FLAGS, f"--user-data-dir={folder / 'profile'}",
           f"--window-size={width},1000", "--dump-dom", page.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Chromium did not finish rendering the report in 120 s: {' '.join(cmd)}")
    found = re.search(r'<pre id="kmec-measure">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"Chromium ran (exit {done.returncode}) but measured nothing: {done.stderr[-2000:]}"
    return json.loads(html_lib.unescape(found.group(1)))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return render_in_browser(to_html(batch_report()), tmp_path_factory.mktemp("chromium"))


def _chart(measured: dict, label_start: str) -> dict:
    found = [v for k, v in measured["charts"].items() if k.startswith(label_start)]
    assert len(found) == 1, sorted(measured["charts"])
    return found[0]


def _drawn(boxes: list[list[float]]) -> int:
    return sum(w > 0 or h > 0 for w, h in boxes)


def test_claim_chart_is_drawn(measured):
    chart = _chart(measured, "claim scores")
    w, h = chart["box"]
    assert w >= 600 and h >= 150
    marks = chart["marks"]
    assert len(marks["threshold"]) == 3 and all(h >= 40 for _, h in marks["threshold"])
    bars = marks["mean"] + marks["declared"] + marks["heldout"]
    assert len(bars) == 8 and all(w > 100 and h > 5 for w, h in bars)  # scores 0.9..1
    assert _drawn(marks["dot"]) == 36


def test_probability_chart_is_drawn(measured):
    chart = _chart(measured, "P(new) and P(old)")
    assert chart["box"][0] >= 600 and chart["box"][1] >= 12 * 20
    new, old = chart["marks"]["new"], chart["marks"]["old"]
    assert len(new) == len(old) == 12
    # a dumbbell spans its before and after dots: P(new) rose from ~0 to 0.12..0.84
    assert all(w > 40 for w, _ in new) and all(h >= 8 for _, h in new + old)


def test_heat_map_is_drawn(measured):
    chart = _chart(measured, "locality heat map")
    w, h = chart["box"]
    assert w >= 500 and h >= 12 * 18
    cells = chart["marks"]["cell"]
    assert len(cells) >= 12 * 20 and all(14 <= w <= 18 and 14 <= h <= 18 for w, h in cells)


def test_collapsed_charts_take_no_room_and_the_page_is_short(measured):
    # the KL histogram sits in a closed <details>: in the page, not shown
    assert not _chart(measured, "histogram of locality KL")["visible"]
    assert all(_chart(measured, c)["visible"] for c in ("claim", "P(new)", "locality heat"))
    # a dozen edits with failures, three charts and the source: about 3,100 px at 1280 wide
    # (the report before the charts, a table per failure, was ~1,000 px taller for a
    # dozen edits, several thousand for a batch with many failing locality checks)
    assert 1500 < measured["height"] < 4500, measured["height"]
