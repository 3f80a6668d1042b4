"""What a report found, put into words and grouped for reading (pure functions of a Report).

Contents:
    anchor()            a stable HTML id for one claim on one edit (links from the claims table)
    probe_reason()      why one probe failed, in words ("KL 0.34 over the budget 0.1")
    claim_reason()      why one claim failed on one edit, in words
    FailingPrompt       a failing prompt of a batch, once, with the edits it failed on
    failing_prompts()   the failing probes of the failed claims, deduplicated across edits
    SharedExample       a minimal counterexample, once, with the edits it was found for
    counterexamples()   the counterexamples of a batch, deduplicated by prompt
    HeatMap             edits x locality prompts: KL and top-1 change per cell
    heat_map()          the heat map of the prompts where the edits moved the model most

The renderers (:mod:`kmec.verify.render`) show these; nothing here formats HTML
or Markdown, so both reports state the same reasons.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from kmec.verify.report import ClaimResult, ProbeResult, Report


def anchor(claim: str, edit: str) -> str:
    """A stable HTML id for ``claim`` on ``edit``: the letters and digits of both, then a
    checksum of the whole text, so two names that clean up alike stay apart.

    >>> anchor("locality[kl<=0.1]", "france")
    'f-locality-kl-0-1-france-6cf2'
    """
    text = f"{claim}|{edit}"
    clean = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    tag = sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % 0xFFFF
    return f"f-{clean[:60]}-{tag:04x}"


def _tok(side_top: Sequence[object]) -> str | None:
    return side_top[0].token if side_top else None  # type: ignore[attr-defined]


def _q(text: str | None) -> str:
    return "nothing" if text is None else repr(text)


def probe_reason(p: ProbeResult, c: ClaimResult) -> str:
    """Why probe ``p`` of claim ``c`` failed, in words ("" when it did not).

    Locality: the top-1 token changed, or the KL divergence is over the claim's
    budget. ``prob`` with an old target: P(new) is not above P(old); without one:
    the top-1 token is not the target's first. ``token``: the teacher-forced token
    accuracy is below the threshold. ``greedy``: greedy decoding does not give the
    target.
    """
    if p.ok:
        return ""
    if c.metric == "locality":
        before, after = _tok(p.base.top), _tok(p.edited.top)
        if before != after:
            return f"top-1 is {_q(after)}, not {_q(before)} as before the edit"
        kl = p.edited.kl
        if c.kl_budget is not None and kl is not None and kl > c.kl_budget:
            return f"KL {kl:.3g} over the budget {c.kl_budget:g}"
        return "the edited model no longer agrees with the base model"
    e = p.edited
    if c.protocol == "prob":
        if p.old is not None and e.p_target is not None and e.p_old is not None:
            return (f"P(new {_q(p.target)}) {e.p_target:.3g} not above "
                    f"P(old {_q(p.old)}) {e.p_old:.3g}")
        return f"top-1 is {_q(_tok(e.top))}, not the first token of {_q(p.target)}"
    if c.protocol == "token":
        return f"token accuracy {p.value:.2f} below {c.threshold:g} on {_q(p.target)}"
    return f"greedy decoding does not give {_q(p.target)}"


def claim_reason(c: ClaimResult) -> str:
    """Why claim ``c`` failed on its edit, in words ("" when it did not).

    >>> from kmec.verify.report import ClaimResult
    >>> claim_reason(ClaimResult(claim="efficacy", metric="efficacy", protocol="prob",
    ...     threshold=1.0, declared=True, edit="e", status="fail", score=0.5, n=2))
    'efficacy 0.500 below the threshold 1 (0 of 2 prompts failed)'
    """
    if c.status != "fail" or c.score is None:
        return ""
    bad = [p for p in c.probes if not p.ok]
    text = (f"{c.metric} {c.score:.3f} below the threshold {c.threshold:g} "
            f"({len(bad)} of {c.n} prompts failed")
    if c.metric == "locality" and bad:
        top1 = sum(_tok(p.base.top) != _tok(p.edited.top) for p in bad)
        parts = [f"{top1} top-1 change{'s' if top1 != 1 else ''}"] if top1 else []
        if len(bad) > top1:
            parts.append(f"{len(bad) - top1} KL over the budget {c.kl_budget:g}")
        text += ": " + ", ".join(parts)
    return text + ")"


@dataclass
class FailingPrompt:
    """A prompt that failed a claim on one or more edits of a batch.

    Attributes:
        claim, kind, prompt, target: what was checked (``target``: None for locality).
        edits: ``(edit, reason, anchor)`` per edit it failed on, worst first.
        worst_kl: the largest KL over those edits (locality; 0 otherwise).
    """

    claim: str
    kind: str
    prompt: str
    target: str | None
    edits: list[tuple[str, str, str]] = field(default_factory=list)
    worst_kl: float = 0.0


def failing_prompts(report: Report) -> list[FailingPrompt]:
    """The failing probes of every failed claim, one entry per (claim, prompt, target),
    with the edits it failed on; the prompts that failed on most edits come first."""
    found: dict[tuple[str, str, str | None], FailingPrompt] = {}
    for c in report.claims:
        if c.status != "fail":
            continue
        for p in c.probes:
            if p.ok:
                continue
            key = (c.claim, p.prompt, p.target)
            entry = found.setdefault(key, FailingPrompt(c.claim, p.kind, p.prompt, p.target))
            entry.edits.append((c.edit, probe_reason(p, c), anchor(c.claim, c.edit)))
            entry.worst_kl = max(entry.worst_kl, p.edited.kl or 0.0)
    return sorted(found.values(), key=lambda f: (-len(f.edits), -f.worst_kl, f.claim, f.prompt))


@dataclass
class SharedExample:
    """A minimal counterexample found for one or more edits.

    Attributes:
        prompt, source: the prompt and the neighbourhood it was drawn from.
        why: the reason for the first edit it was found for.
        edits: ``(edit, why, failed, anchor)`` per edit: ``failed`` when that
            edit's locality claim failed (else the disagreement stayed within it).
        worst_kl: the largest KL over those edits.
    """

    prompt: str
    source: str
    why: str
    edits: list[tuple[str, str, bool, str]] = field(default_factory=list)
    worst_kl: float = 0.0


def counterexamples(report: Report) -> list[SharedExample]:
    """Every claim's minimal counterexample, once per prompt, with the edits it was found
    for (a shared neighbour that every edit of a batch disturbs is shown once)."""
    found: dict[str, SharedExample] = {}
    for c in report.claims:
        x = c.counterexample
        if x is None:
            continue
        entry = found.setdefault(x.prompt, SharedExample(x.prompt, x.source, x.why))
        if all(e[0] != c.edit for e in entry.edits):
            entry.edits.append((c.edit, x.why, c.status == "fail", anchor(c.claim, c.edit)))
        entry.worst_kl = max(entry.worst_kl, x.kl)
    return sorted(found.values(), key=lambda s: (-len(s.edits), -s.worst_kl, s.prompt))


@dataclass
class HeatCell:
    """One edit on one locality prompt: its KL, whether top-1 changed, whether it failed."""

    kl: float | None
    changed: bool
    ok: bool
    before: str | None
    after: str | None


@dataclass
class HeatMap:
    """Edits (rows) x locality prompts (columns), the columns the worst-hit prompts.

    Attributes:
        edits: row labels, in report order.
        prompts: column labels, worst first (a top-1 change anywhere, then the largest KL).
        cells: ``(edit, prompt) -> HeatCell`` (missing: the prompt was not checked on that edit).
        budget: the smallest KL budget of the locality claims (None: none declared).
        total: distinct locality prompts in the report; ``len(prompts)`` of them are shown.
        per_edit: ``edit -> (disagreeing, checked)`` over all its locality prompts.
    """

    edits: list[str]
    prompts: list[str]
    cells: dict[tuple[str, str], HeatCell]
    budget: float | None
    total: int
    per_edit: dict[str, tuple[int, int]]


def heat_map(report: Report, columns: int = 40) -> HeatMap | None:
    """The edits x locality prompts heat map, on the ``columns`` prompts where the edits
    moved the model most (None when no locality claim was checked)."""
    loc = [c for c in report.claims if c.metric == "locality" and c.probes]
    if not loc:
        return None
    cells: dict[tuple[str, str], HeatCell] = {}
    per_edit: dict[str, list[int]] = {}
    for c in loc:
        counts = per_edit.setdefault(c.edit, [0, 0])
        for p in c.probes:
            before, after = _tok(p.base.top), _tok(p.edited.top)
            cell = HeatCell(p.edited.kl, before != after, p.ok, before, after)
            old = cells.get((c.edit, p.prompt))
            if old is None:
                counts[1] += 1
                counts[0] += not p.ok
                cells[(c.edit, p.prompt)] = cell
            elif (cell.kl or 0.0) > (old.kl or 0.0) or not cell.ok:
                counts[0] += old.ok and not cell.ok
                cells[(c.edit, p.prompt)] = cell
    worst: dict[str, tuple[int, int, float]] = {}
    for (_, prompt), cell in cells.items():
        w = worst.get(prompt, (0, 0, 0.0))
        worst[prompt] = (w[0] + cell.changed, w[1] + (not cell.ok), max(w[2], cell.kl or 0.0))
    order = sorted(worst, key=lambda q: (-worst[q][0], -worst[q][1], -worst[q][2], q))
    edits = [e.name for e in report.edits if e.name in per_edit]
    edits += [name for name in per_edit if name not in edits]
    budgets = [c.kl_budget for c in loc if c.kl_budget is not None]
    return HeatMap(edits=edits, prompts=order[:columns], cells=cells,
                   budget=min(budgets) if budgets else None, total=len(order),
                   per_edit={k: (v[0], v[1]) for k, v in per_edit.items()})
