"""``kmec diff A B``: what changed between two specs, two builds or two reports.

Contents:
    Side             one input as read: what it is, its spec, plan and report (when it has them)
    Change           one difference: section, what, before, after
    Diff             every change between two sides, in a fixed order
    read_side()      a ``.kmec`` file, a build directory, a report folder or ``report.json``
    diff()           compare two sides
    render_text()    aligned plain text (CI logs)
    render_markdown() a Markdown table per section (pull-request comments)

Sections, in order: ``settings`` (model, seed, order, method, budget, chat), ``edits``
(added, removed, or a field changed: subject, targets, scope, preserve, ...),
``claims`` (by label: added, removed, threshold or options changed), ``plan``
(per step: backend, layers, edits, protected prompts, each parameter), and
``scores`` (per claim the mean, per claim and edit the score and status) when
both sides carry a verification report. A build's report is the one
``kmec verify BUILD`` wrote to ``BUILD/report/report.json``; a spec has no plan
and no scores, so comparing a spec with a build compares what both have.
Scores are listed when they moved by more than :data:`SCORE_EPS`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from kmec.errors import KmecError
from kmec.planner.model import Plan
from kmec.spec import Spec
from kmec.verify.claims import claim_label
from kmec.verify.report import Report

Kind = Literal["spec", "build", "report"]
SCORE_EPS = 1e-6
SETTINGS = ("model", "seed", "order", "method", "budget", "chat")


class Side(BaseModel):
    """One input of a diff, as read."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: str
    kind: Kind
    spec: Spec
    plan: Plan | None = None
    report: Report | None = None


class Change(BaseModel):
    """One difference. ``before``/``after`` are None for something added/removed."""

    model_config = ConfigDict(frozen=True)

    section: Literal["settings", "edits", "claims", "plan", "scores"]
    what: str
    before: Any = None
    after: Any = None

    @property
    def verb(self) -> str:
        if self.before is None:
            return "added"
        if self.after is None:
            return "removed"
        return "changed"


class Diff(BaseModel):
    """Every change from ``a`` to ``b`` (empty: nothing differs in what both carry)."""

    model_config = ConfigDict(frozen=True)

    a: str
    b: str
    a_kind: Kind
    b_kind: Kind
    compared: tuple[str, ...]
    changes: tuple[Change, ...]

    def edits_changed(self) -> tuple[str, ...]:
        """Names of the edits added, removed or changed (in order of first mention)."""
        return tuple(dict.fromkeys(c.what.split(".")[0] for c in self.changes
                                   if c.section == "edits"))


# ---------------------------------------------------------------------------- reading

def read_side(path: str | Path, *, root: str | Path | None = None) -> Side:
    """Read a spec file, a build directory, a report folder or a ``report.json``.

    Raises:
        KmecError: the path does not exist or is none of these (exit code 2).
    """
    from kmec.artifacts.build import read_build
    from kmec.grammar import parse_file

    p = Path(path)
    if not p.exists():
        raise KmecError(f"{p} does not exist", hint="give two .kmec files, two build "
                        "directories or two report.json files")
    if p.is_file() and p.suffix == ".kmec":
        return Side(path=str(p), kind="spec", spec=parse_file(p, root=root))
    if p.is_dir() and (p / "plan.json").is_file():
        plan, spec, _info, _artifact = read_build(p)
        report_file = p / "report" / "report.json"
        report = _read_report(report_file) if report_file.is_file() else None
        return Side(path=str(p), kind="build", spec=spec, plan=plan, report=report)
    report_file = p / "report.json" if p.is_dir() else p
    if report_file.is_file() and report_file.suffix == ".json":
        report = _read_report(report_file)
        plan = Plan.model_validate(report.plan) if report.plan else None
        return Side(path=str(p), kind="report", spec=Spec.model_validate(report.spec), plan=plan,
                    report=report)
    raise KmecError(f"{p} is not a spec, a build directory or a verification report",
                    hint="give a .kmec file, the folder kmec compile wrote (it holds plan.json), "
                    "or a report.json kmec verify wrote")


def _read_report(path: Path) -> Report:
    try:
        return Report.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KmecError(f"{path} is not a kmec verification report ({first})",
                        hint="give the report.json that kmec verify wrote") from None


# ---------------------------------------------------------------------------- comparing

def diff(a: Side, b: Side) -> Diff:
    """Every change from ``a`` to ``b`` in what both carry (see the module docstring)."""
    changes = list(_settings(a.spec, b.spec)) + list(_edits(a.spec, b.spec)) + \
        list(_claims(a.spec, b.spec))
    compared = ["settings", "edits", "claims"]
    if a.plan is not None and b.plan is not None:
        changes += _plan(a.plan, b.plan)
        compared.append("plan")
    if a.report is not None and b.report is not None:
        changes += _scores(a.report, b.report)
        compared.append("scores")
    return Diff(a=a.path, b=b.path, a_kind=a.kind, b_kind=b.kind, compared=tuple(compared),
                changes=tuple(changes))


def _settings(a: Spec, b: Spec) -> Iterator[Change]:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    for key in SETTINGS:
        if key in ("method", "chat") and da.get(key) is not None and db.get(key) is not None:
            yield from _fields("settings", key, da[key], db[key])
        elif da.get(key) != db.get(key):
            yield Change(section="settings", what=key, before=da.get(key), after=db.get(key))


def _fields(section: Any, prefix: str, a: Mapping[str, Any], b: Mapping[str, Any]
            ) -> Iterator[Change]:
    """A change per key whose value differs (nested mappings flattened with dots)."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            yield from _fields(section, f"{prefix}.{key}", va, vb)
        else:
            yield Change(section=section, what=f"{prefix}.{key}", before=va, after=vb)


def _edits(a: Spec, b: Spec) -> Iterator[Change]:
    return _keyed("edits", {e.name: _without(e.model_dump(mode="json"), "name") for e in a.edits},
                  {e.name: _without(e.model_dump(mode="json"), "name") for e in b.edits},
                  _edit_summary)


def _claims(a: Spec, b: Spec) -> Iterator[Change]:
    return _keyed("claims", {claim_label(c): c.model_dump(mode="json") for c in a.claims},
                  {claim_label(c): c.model_dump(mode="json") for c in b.claims}, _claim_text)


def _keyed(section: Any, a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]],
           summary: Any) -> Iterator[Change]:
    """Items by key: removed, added (each summarised), or changed field by field."""
    for key in [*a, *(k for k in b if k not in a)]:
        if key not in b:
            yield Change(section=section, what=key, before=summary(a[key]))
        elif key not in a:
            yield Change(section=section, what=key, after=summary(b[key]))
        else:
            yield from _fields(section, key, a[key], b[key])


def _without(d: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _edit_summary(d: Mapping[str, Any]) -> str:
    if d.get("kind") == "triple":
        old = f"{d.get('old')!r} -> " if d.get("old") is not None else "-> "
        return f"{d.get('subject')!r} {d.get('relation')} {old}{d.get('new')!r}"
    return f"{d.get('prompt')!r} -> {d.get('target')!r}"


def _claim_text(d: Mapping[str, Any]) -> str:
    return f"{d['metric']} >= {d['threshold']:g}"


def _plan(a: Plan, b: Plan) -> list[Change]:
    out: list[Change] = []
    if a.model != b.model or a.model_fingerprint != b.model_fingerprint:
        out.append(Change(section="plan", what="model", before=a.model_fingerprint[:12],
                          after=b.model_fingerprint[:12]))
    sa, sb = {s.id: s for s in a.steps}, {s.id: s for s in b.steps}
    for sid in [*sa, *(x for x in sb if x not in sa)]:
        if sid not in sb:
            out.append(Change(section="plan", what=sid, before=_step_summary(sa[sid])))
            continue
        if sid not in sa:
            out.append(Change(section="plan", what=sid, after=_step_summary(sb[sid])))
            continue
        x, y = sa[sid], sb[sid]
        for field in ("backend", "layers"):
            if getattr(x, field) != getattr(y, field):
                out.append(Change(section="plan", what=f"{sid}.{field}",
                                  before=_plain(getattr(x, field)), after=_plain(getattr(y, field))))
        ex, ey = [r.name for r in x.edits], [r.name for r in y.edits]
        if ex != ey:
            out.append(Change(section="plan", what=f"{sid}.edits", before=ex, after=ey))
        else:
            for rx, ry in zip(x.edits, y.edits):
                out += _fields("plan", f"{sid}.{rx.name}", rx.model_dump(mode="json"),
                               ry.model_dump(mode="json"))
        if x.protect != y.protect:
            out.append(Change(section="plan", what=f"{sid}.protect",
                              before=f"{len(x.protect)} prompt(s)", after=f"{len(y.protect)} prompt(s)"))
        out += _fields("plan", f"{sid}.params", x.params, y.params)
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _step_summary(step: Any) -> str:
    return f"{step.backend}, {len(step.edits)} edit(s), layers {list(step.layers)}"


def _scores(a: Report, b: Report) -> list[Change]:
    out: list[Change] = []
    for label in dict.fromkeys([*a.aggregate.means, *b.aggregate.means]):
        ma, mb = a.aggregate.means.get(label), b.aggregate.means.get(label)
        if _moved(ma, mb):
            out.append(Change(section="scores", what=f"{label} (mean)", before=ma, after=mb))
    ra = {(r.claim, r.edit): r for r in a.claims}
    rb = {(r.claim, r.edit): r for r in b.claims}
    for key in [*ra, *(k for k in rb if k not in ra)]:
        x, y = ra.get(key), rb.get(key)
        before = None if x is None else _score_text(x)
        after = None if y is None else _score_text(y)
        if x is None or y is None or x.status != y.status or _moved(x.score, y.score):
            out.append(Change(section="scores", what=f"{key[0]} on {key[1]}", before=before,
                              after=after))
    if a.ok != b.ok:
        out.append(Change(section="scores", what="verdict", before=a.summary, after=b.summary))
    return out


def _moved(x: float | None, y: float | None) -> bool:
    if x is None or y is None:
        return x != y
    return abs(x - y) > SCORE_EPS


def _score_text(r: Any) -> str:
    return r.status if r.score is None else f"{r.score:.3f} {r.status}"


# ---------------------------------------------------------------------------- output

def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def render_text(d: Diff) -> str:
    """Aligned plain text, one line per change, grouped by section."""
    lines = [f"kmec diff {d.a} ({d.a_kind}) -> {d.b} ({d.b_kind}); compared: "
             f"{', '.join(d.compared)}"]
    if not d.changes:
        return "\n".join([*lines, "no differences"]) + "\n"
    width = max(len(c.what) for c in d.changes)
    for section in ("settings", "edits", "claims", "plan", "scores"):
        rows = [c for c in d.changes if c.section == section]
        if not rows:
            continue
        lines += ["", f"{section}:"]
        for c in rows:
            lines.append(f"  {c.what:<{width}}  {c.verb:<7}  {_cell(c.before)}  ->  {_cell(c.after)}")
    lines += ["", f"{len(d.changes)} change(s); edits: {', '.join(d.edits_changed()) or 'none'}"]
    return "\n".join(lines) + "\n"


def _md(value: Any) -> str:
    text = _cell(value).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text != "–" else text


def render_markdown(d: Diff) -> str:
    """A Markdown table per section."""
    out = [f"## kmec diff `{d.a}` → `{d.b}`", "",
           f"Compared: {', '.join(d.compared)} ({d.a_kind} → {d.b_kind}).", ""]
    if not d.changes:
        return "\n".join([*out, "No differences."]) + "\n"
    for section in ("settings", "edits", "claims", "plan", "scores"):
        rows = [c for c in d.changes if c.section == section]
        if not rows:
            continue
        out += [f"### {section}", "", "| what | change | before | after |", "|---|---|---|---|"]
        out += [f"| {_md(c.what)} | {c.verb} | {_md(c.before)} | {_md(c.after)} |" for c in rows]
        out.append("")
    return "\n".join(out)
