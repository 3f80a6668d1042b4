"""Inline SVG charts for the HTML report (no script, no external asset: the page works offline).

Contents:
    kl_histogram_svg()  locality KL over the sampled prompts, log scale, the budget marked
    prob_chart_svg()    per edit, P(new) and P(old) before -> after (a dumbbell per edit)
    claim_chart_svg()   per claim, the score against its threshold: mean over edits (each
                        edit a dot), declared and held-out prompts
    heatmap_svg()       edits x locality prompts: KL colour, top-1 changes and failures marked

Every mark a reader should see carries ``class="mark ..."`` and a ``<title>`` (hover text);
the browser test (tests/verify/test_render_browser.py) checks that the marks are drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import escape

from kmec.verify.findings import HeatMap
from kmec.verify.report import EditRow, Report

FONT = 'font-family="Helvetica, Arial, sans-serif"'
NEW, OLD, PASS, FAIL, INK, GRID = "#2e7d4f", "#d9822b", "#2e8b57", "#c0392b", "#1d232a", "#dde3ea"
DARK_RED = "#7f140a"


def _svg(width: float, height: float, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(label)}" {FONT}>')


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _num(v: float | None, d: int = 3) -> str:
    return "–" if v is None else f"{v:.{d}g}" if v < 0.001 else f"{v:.{d}f}"


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
    parts = [_svg(width, height, "histogram of locality KL"),
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        x = pad + i * bar_w
        parts.append(f'<rect class="mark bin" x="{x + 1:.1f}" y="{16 + plot_h - h:.1f}" '
                     f'width="{bar_w - 2:.1f}" height="{h:.1f}" fill="#4a78b5">'
                     f'<title>{c} prompt(s)</title></rect>')
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
        parts.append(f'<line x1="{x:.1f}" y1="12" x2="{x:.1f}" y2="{base}" stroke="{FAIL}" '
                     f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="22" font-size="10" '
                     f'fill="{FAIL}">budget {escape(f"{budget:g}")}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 2}" font-size="10" text-anchor="middle">'
                 f'KL(base ‖ edited) in nats, {len(values)} locality prompts</text></svg>')
    return "".join(parts)


def _dumbbell(y: float, x0: float, w: float, before: float, after: float, colour: str,
              kind: str, title: str) -> str:
    a, b = x0 + w * min(max(before, 0.0), 1.0), x0 + w * min(max(after, 0.0), 1.0)
    return (f'<g class="mark {kind}"><title>{escape(title)}</title>'
            f'<line x1="{a:.1f}" y1="{y:.1f}" x2="{b:.1f}" y2="{y:.1f}" stroke="{colour}" '
            f'stroke-width="2.5"/><circle cx="{a:.1f}" cy="{y:.1f}" r="4" fill="#fff" '
            f'stroke="{colour}" stroke-width="1.5"/><circle cx="{b:.1f}" cy="{y:.1f}" r="4.5" '
            f'fill="{colour}"/></g>')


def prob_chart_svg(rows: Sequence[EditRow], *, width: int = 760) -> str:
    """Per edit, P(new) (green) and P(old) (orange) before (hollow) -> after (filled) on the
    edit prompt, on a linear 0..1 axis; the numbers are written at the right."""
    left, right, top, row_h = 150, 190, 34, 26
    plot_w = width - left - right
    height = top + row_h * len(rows) + 8
    parts = [_svg(width, height, "P(new) and P(old) before and after each edit"),
             f'<text x="{left}" y="12" font-size="11" fill="{NEW}">● P(new) after</text>'
             f'<text x="{left + 100}" y="12" font-size="11" fill="{OLD}">● P(old) after</text>'
             f'<text x="{left + 196}" y="12" font-size="11" fill="#57606a">○ before the edit</text>']
    for k in range(5):
        x = left + plot_w * k / 4
        parts.append(f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{height - 6}" '
                     f'stroke="{GRID}"/><text x="{x:.1f}" y="{top - 11}" font-size="9" '
                     f'text-anchor="middle" fill="#57606a">{k / 4:g}</text>')
    for i, e in enumerate(rows):
        y = top + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 15}" font-size="11" text-anchor="end">'
                     f'<title>{escape(e.name)}: {escape(e.prompt)} → {escape(e.target_new)}'
                     f'</title>{escape(_short(e.name, 22))}</text>')
        b, a = e.base.p_target, e.edited.p_target
        text = []
        if b is not None and a is not None:
            parts.append(_dumbbell(y + 7, left, plot_w, b, a, NEW, "new",
                                   f"{e.name}: P({e.target_new!r}) {b:.4g} → {a:.4g}"))
            text.append(f'<tspan fill="{NEW}">new {_num(b)}→{_num(a)}</tspan>')
        b, a = e.base.p_old, e.edited.p_old
        if b is not None and a is not None:
            parts.append(_dumbbell(y + 16, left, plot_w, b, a, OLD, "old",
                                   f"{e.name}: P({e.target_old!r}) {b:.4g} → {a:.4g}"))
            text.append(f'<tspan fill="{OLD}"> old {_num(b)}→{_num(a)}</tspan>')
        parts.append(f'<text x="{width - right + 10}" y="{y + 15}" font-size="10">'
                     f'{"".join(text)}</text>')
    return "".join(parts) + "</svg>"


def _bar(y: float, x0: float, w: float, value: float | None, threshold: float, label: str,
         kind: str, title: str) -> str:
    parts = [f'<text x="{x0 - 8}" y="{y + 9}" font-size="10" text-anchor="end" '
             f'fill="#57606a">{escape(label)}</text>',
             f'<rect x="{x0}" y="{y}" width="{w}" height="11" fill="#f0f3f7"/>']
    if value is None:
        parts.append(f'<text x="{x0 + 4}" y="{y + 9}" font-size="10" fill="#8a949e">'
                     f'no such prompts</text>')
        return "".join(parts)
    colour = PASS if value + 1e-9 >= threshold else FAIL
    parts.append(f'<rect class="mark bar {kind}" x="{x0}" y="{y}" '
                 f'width="{max(w * min(max(value, 0.0), 1.0), 1.5):.1f}" height="11" '
                 f'fill="{colour}" fill-opacity="0.8"><title>{escape(title)}</title></rect>'
                 f'<text x="{x0 + w + 6}" y="{y + 9}" font-size="10">{value:.3f}</text>')
    return "".join(parts)


def claim_chart_svg(report: Report, *, width: int = 760) -> str:
    """Per claim: the mean score over edits (a dot per edit, red where the edit fails), the
    score on declared prompts and on held-out prompts, each against the threshold (the dark
    marker); a ``heldout`` claim is decided on held-out prompts alone. A report written
    before the declared/held-out split existed shows the mean alone."""
    labels = list(dict.fromkeys(c.claim for c in report.claims))
    left, right = 170, 60
    plot_w = width - left - right
    heights = [70 if label in report.aggregate.split else 40 for label in labels]
    parts = [_svg(width, 12 + sum(heights), "claim scores against their thresholds")]
    y = 10
    for label, group_h in zip(labels, heights):
        rows = [c for c in report.claims if c.claim == label]
        t = rows[0].threshold
        split = report.aggregate.split.get(label)
        decides = "held-out prompts" if rows[0].heldout else "its prompts, per edit"
        parts.append(f'<text x="0" y="{y + 10}" font-size="12" font-weight="bold">'
                     f'{escape(_short(label, 28))}</text><text x="{left}" y="{y + 10}" '
                     f'font-size="10" fill="#57606a">threshold {t:g}, decided on {decides}</text>')
        scored = [c for c in rows if c.score is not None]
        mean = report.aggregate.means.get(label)
        parts.append(_bar(y + 16, left, plot_w, mean, t, "mean over edits", "mean",
                          f"{label}: mean {mean} over {len(scored)} edit(s)"))
        for c in scored:
            x = left + plot_w * min(max(c.score or 0.0, 0.0), 1.0)
            parts.append(f'<circle class="mark dot" cx="{x:.1f}" cy="{y + 21.5}" r="3" '
                         f'fill="{PASS if c.status == "pass" else FAIL}" stroke="#fff">'
                         f'<title>{escape(c.edit)}: {c.score:.3f} ({c.status})</title></circle>')
        for j, (name, kind) in enumerate((("declared", "declared"), ("held out", "heldout"))):
            if split is None:
                break
            value, n = getattr(split, kind), getattr(split, f"{kind}_n")
            parts.append(_bar(y + 31 + 15 * j, left, plot_w, value, t, f"{name} ({n} prompts)",
                              kind, f"{label}: {name} prompts {value} over {n} prompt(s)"))
        x = left + plot_w * min(max(t, 0.0), 1.0)
        parts.append(f'<line class="mark threshold" x1="{x:.1f}" y1="{y + 13}" x2="{x:.1f}" '
                     f'y2="{y + group_h - 9}" stroke="{INK}" stroke-width="2"><title>threshold '
                     f'{t:g}</title></line>')
        y += group_h
    return "".join(parts) + "</svg>"


def _mix(lo: tuple[int, int, int], hi: tuple[int, int, int], t: float) -> str:
    r, g, b = (round(a + (z - a) * min(max(t, 0.0), 1.0)) for a, z in zip(lo, hi))
    return f"#{r:02x}{g:02x}{b:02x}"


def _kl_colour(kl: float | None, budget: float | None) -> str:
    """Light to mid blue from KL 1e-5 up to the budget, orange to dark red above it (up to
    100 times the budget), on log scales; without a budget, blue from 1e-5 to 10 nats.

    >>> _kl_colour(1e-9, 0.1), _kl_colour(0.1, 0.1), _kl_colour(10.0, 0.1)
    ('#f0f6fc', '#4285c2', '#7f140a')
    """
    x = math.log10(max(kl or 0.0, 1e-9))
    if budget is None or budget <= 0:
        return _mix((240, 246, 252), (8, 48, 107), (x + 5) / 6)
    b = math.log10(budget)
    if kl is not None and kl > budget:
        return _mix((245, 166, 35), (127, 20, 10), (x - b) / 2)
    return _mix((240, 246, 252), (66, 133, 194), (x + 5) / (b + 5))


def heatmap_svg(hm: HeatMap, *, cell: int = 18) -> str:
    """Edits (rows) x the worst-hit locality prompts (columns): fill = KL (blue within the
    budget, orange to red over it), × = the top-1 token changed, dark red outline = the probe
    disagrees (it counts against its claim), a dot = the prompt was not checked on that edit."""
    left, top, right = 140, 150, 90
    width = max(left + cell * len(hm.prompts) + right, left + 660)
    height = top + cell * len(hm.edits) + 44
    parts = [_svg(width, height, "locality heat map: KL per edit and prompt")]
    for j, prompt in enumerate(hm.prompts):
        x = left + j * cell + cell / 2
        parts.append(f'<text transform="translate({x + 3:.1f},{top - 6}) rotate(-55)" '
                     f'font-size="10"><title>{escape(prompt)}</title>{escape(_short(prompt, 26))}'
                     f'</text>')
    parts.append(f'<text x="{width - right + 6}" y="{top - 6}" font-size="10" '
                 f'fill="#57606a">disagree</text>')
    for i, edit in enumerate(hm.edits):
        y = top + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell - 5}" font-size="11" text-anchor="end">'
                     f'<title>{escape(edit)}</title>{escape(_short(edit, 20))}</text>')
        for j, prompt in enumerate(hm.prompts):
            x = left + j * cell
            c = hm.cells.get((edit, prompt))
            if c is None:
                parts.append(f'<circle cx="{x + cell / 2 - 0.5}" cy="{y + cell / 2 - 0.5}" r="1" '
                             f'fill="#c4cad1"><title>not checked on {escape(edit)}</title>'
                             f'</circle>')
                continue
            kl = "–" if c.kl is None else f"{c.kl:.3g}"
            title = (f"{edit} · {prompt}\nKL {kl}; top-1 {c.before!r} → {c.after!r}"
                     + ("" if c.ok else " (disagrees)"))
            stroke = f' stroke="{DARK_RED}" stroke-width="2"' if not c.ok else ""
            parts.append(f'<rect class="mark cell" x="{x + (0 if c.ok else 1)}" '
                         f'y="{y + (0 if c.ok else 1)}" width="{cell - (1 if c.ok else 3)}" '
                         f'height="{cell - (1 if c.ok else 3)}" fill="{_kl_colour(c.kl, hm.budget)}"{stroke}>'
                         f'<title>{escape(title)}</title></rect>')
            if c.changed:
                parts.append(f'<text x="{x + cell / 2 - 0.5:.1f}" y="{y + cell - 5}" '
                             f'font-size="13" font-weight="bold" text-anchor="middle" '
                             f'fill="{INK}">×</text>')
        bad, n = hm.per_edit.get(edit, (0, 0))
        parts.append(f'<text x="{width - right + 6}" y="{y + cell - 5}" font-size="10" '
                     f'fill="{FAIL if bad else INK}">{bad}/{n}</text>')
    y = top + cell * len(hm.edits) + 14
    lo, hi = -5.0, (math.log10(hm.budget) + 2 if hm.budget else 1.0)
    for k in range(21):
        parts.append(f'<rect x="{left + k * 8}" y="{y}" width="8" height="10" '
                     f'fill="{_kl_colour(10 ** (lo + (hi - lo) * k / 20), hm.budget)}"/>')
    parts.append(f'<text x="{left - 6}" y="{y + 9}" font-size="10" text-anchor="end">KL 1e-5'
                 f'</text><text x="{left + 172}" y="{y + 9}" font-size="10">{10 ** hi:g}</text>')
    if hm.budget is not None and hm.budget > 0:
        x = left + 168 * (math.log10(hm.budget) - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{y - 3}" x2="{x:.1f}" y2="{y + 13}" '
                     f'stroke="{INK}" stroke-width="2"/><text x="{x:.1f}" y="{y + 24}" '
                     f'font-size="9" text-anchor="middle">budget {hm.budget:g}</text>')
    parts.append(f'<text x="{left + 210}" y="{y + 9}" font-size="10">× top-1 changed · '
                 f'<tspan fill="{DARK_RED}">dark outline</tspan>: disagrees (counts against the '
                 f'claim) · '
                 f'<tspan fill="#8a949e">·</tspan> not checked on that edit</text>')
    return "".join(parts) + "</svg>"
