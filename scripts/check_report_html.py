"""Render a kmec verification report in a real headless browser.

    .venv/bin/python scripts/check_report_html.py build/report/report.html [--out shot.png]

Runs headless Chromium on the report (no network: the report must be
self-contained) and checks that

* the page loads and Chromium writes a screenshot (a non-trivial PNG), and
* the DOM Chromium built holds the report's parts: the status badge, the
  claims table, the edits table and the inline SVG histogram.

Look at the screenshot to see the page as a reader does. Install the browser
with ``apt-get install -y chromium``. Exits 0 when the checks pass, 1 when
they fail, 2 when no browser is installed.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars"]
EXPECTED = ["kmec verify", "<svg", "Claims", "Edits", "Weight audit", "badge"]


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", data[16:24])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="screenshot path (PNG)")
    ap.add_argument("--height", type=int, default=2400, help="window height of the screenshot")
    args = ap.parse_args()
    exe = browser()
    if exe is None:
        print("no chromium found: apt-get install -y chromium", file=sys.stderr)
        return 2
    url = args.html.resolve().as_uri()
    out = args.out or Path(tempfile.mkdtemp(prefix="kmec-shot-")) / "report.png"
    with tempfile.TemporaryDirectory(prefix="kmec-chromium-") as profile:
        flags = FLAGS + [f"--user-data-dir={profile}", f"--window-size=1280,{args.height}"]
        shot = subprocess.run([exe, *flags, f"--screenshot={out}", url], capture_output=True,
                              text=True, timeout=120, check=False)
        dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120, check=False)
    problems = []
    if shot.returncode != 0 or not out.exists():
        problems.append(f"no screenshot (exit {shot.returncode}): {shot.stderr[-500:]}")
    else:
        w, h = png_size(out)
        if out.stat().st_size < 20_000 or w < 800:
            problems.append(f"screenshot looks empty ({w}x{h}, {out.stat().st_size} bytes)")
    missing = [s for s in EXPECTED if s not in dom.stdout]
    if dom.returncode != 0 or missing:
        problems.append(f"rendered DOM lacks {missing} (exit {dom.returncode})")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {args.html} rendered by {Path(exe).name}; screenshot {out} "
              f"({'x'.join(map(str, png_size(out)))}), DOM {len(dom.stdout)} chars")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
