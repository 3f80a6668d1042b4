"""Pictures and pages for causal traces: self-contained SVG, Markdown and HTML.

Contents:
    svg_heatmap()   one TraceResult as a positions × layers heat map (ROME Figure 1 style)
    svg_curves()    mean indirect-effect curves over layers for several results
    markdown()      a short report linking the SVG files
    html()          the same report as one HTML page with the SVGs inlined
    slug()          a file-name-safe short name for a prompt

The SVG is written by hand (no plotting library): rectangles, text and
polylines with a ``<title>`` on every cell so a browser shows the value.
"""

from __future__ import annotations

import html as _html
import re
from collections.abc import Mapping, Sequence

from kmec.models.trace import TraceResult

# ROME's colours: purple for hidden states, green for MLPs, red for attention.
COLOURS = {"hidden": (84, 39, 143), "mlp": (0, 109, 44), "attn": (165, 15, 21)}
CELL_W, CELL_H = 14, 20


def _esc(text: str) -> str:
    return _html.escape(text, quote=True)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _shade(v: float, rgb: tuple[int, int, int]) -> str:
    """White at 0, ``rgb`` at 1 (values are clamped to [0, 1])."""
    v = min(max(v, 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * v) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _label(result: TraceResult, pos: int) -> str:
    text = result.tokens[pos].replace("\n", "\\n")
    return text + ("*" if result.subject_first <= pos <= result.subject_last else "")


def svg_heatmap(result: TraceResult) -> str:
    """Heat map of ``IE(layer, position)``: rows are tokens (``*`` marks the
    subject), columns layers; colour scales from 0 to the largest IE.

    >>> from kmec.models.trace import TraceResult
    >>> r = TraceResult(prompt="a b", subject="a", target=None, answer="x", answer_id=0,
    ...     tokens=("a", " b"), subject_first=0, subject_last=0, last=1, kind="mlp", window=1,
    ...     samples=1, seed=0, noise_std=1.0, n_layers=2, positions=(0, 1), p_clean=0.9,
    ...     p_corrupted=0.1, p_restored=((0.5, 0.1), (0.2, 0.9)))
    >>> svg = svg_heatmap(r)
    >>> svg.startswith("<svg") and svg.count("<rect") >= 4 and "a*" in svg
    True
    """
    ie = result.ie
    top = max((max(row) for row in ie), default=0.0)
    scale = top if top > 1e-12 else 1.0
    rgb = COLOURS[result.kind]
    labels = [_label(result, p) for p in result.positions]
    left = 12 + 7 * max(len(t) for t in labels)
    top_m, n_l, n_p = 58, result.n_layers, len(result.positions)
    title = (f"{result.kind} restored (window {result.window}): "
             f"{result.prompt!r} → {result.answer!r}")
    width = max(left + n_l * CELL_W + 90, 16 + 7 * len(title))
    height = top_m + n_p * CELL_H + 44
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'),
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="18" font-size="13" font-weight="bold">{_esc(title)}</text>',
           (f'<text x="8" y="36">P_clean {_fmt(result.p_clean)}, P_corrupted '
           f'{_fmt(result.p_corrupted)}, {result.samples} noise samples (std '
           f'{_fmt(result.noise_std)}); colour: indirect effect</text>')]
    for i, pos in enumerate(result.positions):
        y = top_m + i * CELL_H
        out.append(f'<text x="{left - 6}" y="{y + CELL_H * 0.7:.1f}" text-anchor="end" '
                   f'xml:space="preserve">{_esc(labels[i])}</text>')
        for layer in range(n_l):
            v = ie[layer][i]
            out.append(f'<rect x="{left + layer * CELL_W}" y="{y}" width="{CELL_W}" '
                       f'height="{CELL_H}" fill="{_shade(v / scale, rgb)}"><title>layer {layer}, '
                       f'{_esc(labels[i])}: IE {_fmt(v)}</title></rect>')
    y_axis = top_m + n_p * CELL_H
    for layer in range(0, n_l, 5 if n_l > 10 else 1):
        x = left + layer * CELL_W + CELL_W / 2
        out.append(f'<text x="{x:.1f}" y="{y_axis + 14}" text-anchor="middle">{layer}</text>')
    out.append(f'<text x="{left + n_l * CELL_W / 2:.1f}" y="{y_axis + 32}" '
               f'text-anchor="middle">layer</text>')
    out.extend(_colour_bar(left + n_l * CELL_W + 18, top_m, n_p * CELL_H, top, rgb))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _colour_bar(x: int, y: int, h: int, top: float, rgb: tuple[int, int, int]) -> list[str]:
    steps = 20
    out = []
    for k in range(steps):
        v = 1 - k / (steps - 1)
        out.append(f'<rect x="{x}" y="{y + k * h / steps:.1f}" width="12" '
                   f'height="{h / steps + 0.5:.1f}" fill="{_shade(v, rgb)}"/>')
    out.append(f'<rect x="{x}" y="{y}" width="12" height="{h}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{x + 16}" y="{y + 9}">{_fmt(top)}</text>')
    out.append(f'<text x="{x + 16}" y="{y + h}">0</text>')
    return out


def svg_curves(curves: Mapping[str, Sequence[float]], *, title: str) -> str:
    """Line chart of per-layer curves (e.g. mean IE of ``mlp @ subject``).

    Curve names pick their colour by their first word (``hidden``, ``mlp``,
    ``attn``), lighter for each repeat of a word; names ending in ``@ last``
    (the prompt's last token) are dashed.

    >>> svg_curves({"mlp @ subject": [0.0, 0.5, 0.2]}, title="t").count("<polyline")
    1
    """
    w, h, left, top_m, bottom = 680, 300, 56, 36, 40
    n = max(len(c) for c in curves.values())
    lo = min(0.0, *(min(c) for c in curves.values()))
    hi = max(1e-9, *(max(c) for c in curves.values()))
    plot_w, plot_h = w - left - 160, h - top_m - bottom

    def xy(i: int, v: float) -> str:
        x = left + (i / max(n - 1, 1)) * plot_w
        y = top_m + (1 - (v - lo) / (hi - lo)) * plot_h
        return f"{x:.1f},{y:.1f}"

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">'),
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="8" y="20" font-size="13" font-weight="bold">{_esc(title)}</text>',
           (f'<rect x="{left}" y="{top_m}" width="{plot_w}" height="{plot_h}" fill="none" '
           f'stroke="#888"/>')]
    for v in (lo, (lo + hi) / 2, hi):
        y = xy(0, v).split(",")[1]
        out.append(f'<line x1="{left}" y1="{y}" x2="{left + plot_w}" y2="{y}" stroke="#ddd"/>')
        label = f"{v:.2f}".replace("-0.00", "0.00")
        out.append(f'<text x="{left - 4}" y="{y}" text-anchor="end">{label}</text>')
    for i in range(0, n, 5 if n > 10 else 1):
        x = xy(i, lo).split(",")[0]
        out.append(f'<text x="{x}" y="{top_m + plot_h + 14}" text-anchor="middle">{i}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{h - 8}" text-anchor="middle">layer</text>')
    seen: dict[str, int] = {}
    for k, (name, curve) in enumerate(curves.items()):
        family = name.split()[0]
        # repeated families (mlp w1, mlp w6, ...) get lighter shades of their colour
        nth = seen[family] = seen.get(family, -1) + 1
        colour = _shade((1.0, 0.6, 0.35)[nth % 3], COLOURS.get(family, (60, 60, 60)))
        dash = ' stroke-dasharray="5,3"' if name.endswith("@ last") else ""
        pts = " ".join(xy(i, v) for i, v in enumerate(curve))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                   f'stroke-width="2"{dash}><title>{_esc(name)}</title></polyline>')
        ly = top_m + 14 + k * 16
        out.append(f'<line x1="{left + plot_w + 10}" y1="{ly - 4}" x2="{left + plot_w + 30}" '
                   f'y2="{ly - 4}" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{left + plot_w + 34}" y="{ly}">{_esc(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def slug(text: str, limit: int = 40) -> str:
    """File-name-safe short form of a prompt.

    >>> slug("The capital of France is")
    'the-capital-of-france-is'
    """
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "prompt"


def _rows(results: Sequence[TraceResult]) -> list[str]:
    out = [("| prompt | subject | answer | kind | P_clean | P_corrupted | peak layer @ subject "
           "(IE) | peak layer @ last (IE) |"), "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, t = r.ie_subject_last, r.ie_last
        ps, pt = max(range(len(s)), key=s.__getitem__), max(range(len(t)), key=t.__getitem__)
        out.append(f"| {r.prompt} | {r.subject} | {r.answer!r} | {r.kind} (w {r.window}) | "
                   f"{r.p_clean:.3f} | {r.p_corrupted:.3f} | {ps} ({s[ps]:.3f}) | "
                   f"{pt} ({t[pt]:.3f}) |")
    return out


def _peak_words(layers: Sequence[int]) -> str:
    """``peaks at layers 4, 5``, or, for no layers (a curve flat within noise), saying so."""
    if not layers:
        return "is flat within noise: no peak layer"
    return f"peaks at layers {', '.join(map(str, layers))}"


def markdown(results: Sequence[TraceResult], files: Sequence[str], *, model: str,
             peaks: Mapping[str, Sequence[int]], curves_file: str | None) -> str:
    """A Markdown report: a summary table, the peak layers and the figures."""
    lines = [f"# Causal traces of {model}", "",
             ("IE = P(answer | corrupted subject, one state restored) − P(answer | corrupted "
             "subject), averaged over the noise samples (Meng et al. 2022, §2.1)."), ""]
    lines += _rows(results)
    lines.append("")
    for kind, layers in peaks.items():
        lines.append(f"- mean {kind} IE at the subject's last token {_peak_words(layers)}")
    if curves_file:
        lines += ["", f"![mean indirect effect per layer]({curves_file})"]
    lines.append("")
    for r, f in zip(results, files):
        lines += [f"## {r.prompt} → {r.answer.strip()} ({r.kind})", "", f"![{r.kind} trace]({f})", ""]
    return "\n".join(lines)


def html(results: Sequence[TraceResult], svgs: Sequence[str], *, model: str,
         peaks: Mapping[str, Sequence[int]], curves_svg: str | None) -> str:
    """One self-contained HTML page with every figure inlined."""
    rows = "".join(
        f"<tr><td>{_esc(r.prompt)}</td><td>{_esc(r.subject)}</td><td>{_esc(repr(r.answer))}</td>"
        f"<td>{r.kind} (w {r.window})</td><td>{r.p_clean:.3f}</td><td>{r.p_corrupted:.3f}</td></tr>"
        for r in results)
    peak_items = "".join(f"<li>mean {k} IE at the subject's last token {_peak_words(v)}</li>"
                         for k, v in peaks.items())
    figures = "".join(f"<figure>{s}</figure>" for s in svgs)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Causal traces of "
            f"{_esc(model)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px}}"
            f"</style></head><body><h1>Causal traces of {_esc(model)}</h1><table><tr>"
            f"<th>prompt</th><th>subject</th><th>answer</th><th>kind</th><th>P_clean</th>"
            f"<th>P_corrupted</th></tr>{rows}</table><ul>{peak_items}</ul>"
            f"{'<figure>' + curves_svg + '</figure>' if curves_svg else ''}{figures}"
            f"</body></html>\n")
