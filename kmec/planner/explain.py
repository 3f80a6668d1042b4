"""Show a plan to a person: what will be done, in order, and why.

Contents:
    explain()        Plan -> indented plain-text tree (steps, edits, reasons)
    explain_tree()   the same as a ``rich`` Tree (for the CLI)
    summary_table()  the header line and one row per step as ``rich`` renderables (for the CLI)

``explain`` is pure text so it can be logged, diffed and doctested; the rich
variants import rich lazily and are only used by the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kmec.planner.layers import layer_span
from kmec.planner.model import EditRequest, Plan, Step

if TYPE_CHECKING:
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree


def _header(plan: Plan) -> str:
    fp = plan.model_fingerprint[:12] or "unknown"
    return (f"plan for {plan.model} ({plan.model_arch}, fingerprint {fp}) · spec "
            f"{plan.spec_hash[:12]} · seed {plan.seed} · order {plan.order}"
            + (" · chat template" if plan.chat is not None else ""))


def _totals(plan: Plan) -> str:
    n = len(plan.steps)
    return (f"{n} step{'s' if n != 1 else ''}, ~{plan.cost.seconds:g} s, "
            f"peak ~{plan.cost.peak_mb:g} MB")


def _step_line(step: Step) -> str:
    n = len(step.edits)
    parts = [step.id, f"layers {layer_span(step.layers) or '-'}",
             f"{n} edit{'s' if n != 1 else ''}", f"~{step.cost.seconds:g} s",
             f"~{step.cost.peak_mb:g} MB"]
    if step.needs_stats is not None:
        parts.append(f"stats: layers {layer_span(step.needs_stats.layers)}, "
                     f"{step.needs_stats.tokens:,} tokens")
    return "  ".join(parts)


def _drawn(step: Step) -> int:
    """How many wordings the step's backend draws from the model for an edit that
    declares none (``value.wordings``, kmec.backends.wordings)."""
    value = step.params.get("value")
    return int(value.get("wordings", 0)) if isinstance(value, dict) else 0


def _edit_line(edit: EditRequest, drawn: int = 0) -> str:
    text = f"{edit.name}: {edit.prompt!r} -> {edit.target_new!r}"
    extras = []
    if edit.target_old is not None:
        extras.append(f"was {edit.target_old!r}")
    if edit.subject is not None:
        extras.append(f"key {edit.subject!r}")
    else:
        extras.append("key: last prompt token")
    if edit.scope:
        own = len(edit.scope) - len(edit.borrowed)
        extras.append(f"+{own} scope" + (f", +{len(edit.borrowed)} borrowed" if edit.borrowed else ""))
    elif drawn and edit.subject is not None and not edit.inverse:
        extras.append(f"+ up to {drawn} wordings drawn from the model")
    if edit.inverse:
        extras.append("inverse")
    return f"{text} ({'; '.join(extras)})"


def explain(plan: Plan, *, reasons: bool = True) -> str:
    """An indented text tree of the plan.

    Args:
        plan: the plan.
        reasons: include every step's reasons (False: steps and edits only).

    >>> from kmec.planner.model import Cost, Plan
    >>> print(explain(Plan(kmec_version="0", spec_hash="ab" * 32, model="m", model_fingerprint="",
    ...                    model_arch="LlamaForCausalLM", seed=0, order="batch", steps=())))
    plan for m (LlamaForCausalLM, fingerprint unknown) · spec abababababab · seed 0 · order batch
    0 steps, ~0 s, peak ~0 MB
    """
    lines = [_header(plan), _totals(plan)]
    if reasons and plan.reasons:
        lines.append("why:")
        lines += [f"  - {r.choice}: {r.because}" for r in plan.reasons]
    for step in plan.steps:
        lines.append(_step_line(step))
        lines += [f"    {_edit_line(e, _drawn(step))}" for e in step.edits]
        if reasons:
            lines += [f"    - {r.choice}: {r.because}" for r in step.reasons]
    return "\n".join(lines)


def explain_tree(plan: Plan, *, reasons: bool = True) -> Tree:
    """The plan as a rich Tree: header, plan reasons, then each step with edits and reasons."""
    from rich.text import Text
    from rich.tree import Tree

    root = Tree(Text(_header(plan), style="bold"))
    root.add(Text(_totals(plan)))
    if reasons and plan.reasons:
        why = root.add(Text("why", style="bold"))
        for r in plan.reasons:
            why.add(_reason_text(r.choice, r.because))
    for step in plan.steps:
        node = root.add(Text(_step_line(step), style="bold cyan"))
        edits = node.add(Text("edits", style="bold"))
        for e in step.edits:
            edits.add(Text(_edit_line(e, _drawn(step))))
        if reasons:
            why = node.add(Text("why", style="bold"))
            for r in step.reasons:
                why.add(_reason_text(r.choice, r.because))
    return root


def _reason_text(choice: str, because: str) -> Text:
    from rich.text import Text

    text = Text(choice, style="green")
    text.append(f": {because}", style="default")
    return text


def summary_table(plan: Plan) -> Group:
    """The header line, then one row per step: id, backend, layers, edits, statistics, cost.

    The header is a line of its own, not the table's title: a title wraps at the
    table's width ("order" / "batch" on two lines).
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table("step", "backend", "layers", "edits", "stats", "~seconds", "~peak MB",
                  caption=Text(_totals(plan)))
    for s in plan.steps:
        names = ", ".join(e.name for e in s.edits[:3]) + (" ..." if len(s.edits) > 3 else "")
        stats = layer_span(s.needs_stats.layers) if s.needs_stats is not None else "-"
        cells = (s.id, s.backend, layer_span(s.layers) or "-", f"{len(s.edits)}: {names}",
                 stats, f"{s.cost.seconds:g}", f"{s.cost.peak_mb:g}")
        table.add_row(*(Text(c) for c in cells))  # Text: names are data, never markup
    return Group(Text(_header(plan)), table)
