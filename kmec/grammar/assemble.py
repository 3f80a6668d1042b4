"""Statements -> spec nodes: the edit block and the whole file.

Contents:
    Key             (id(node), label): a field of a node ("relation", "scope.2") or
                    a statement line ("header", "}", "subjects") of a built node
    Val, Stmt       a decoded value with its span; a statement with its values
    Built           one file, built: its own Spec (includes not merged), field
                    spans (for diagnostics), statement anchors (for comments),
                    its include statements and the diagnostics found on the way
    Recorder        what the assembly functions need from the builder
    assemble_edit() an edit block's statements -> TripleEdit | PromptEdit
    assemble_spec() a file's statements -> Built

An edit block holds exactly one change: a triple head
``subject "S" relation r "old" -> "new"`` or a prompt head
``prompt "P" -> "target"``. ``subject`` and ``old`` on their own lines belong
to prompt edits; triples write them in the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kmec.errors import Diagnostic, Span
from kmec.spec import ChatSetting, MethodHint, PromptEdit, Spec, TripleEdit

Key = tuple[int, str]


@dataclass(frozen=True)
class Val:
    """A decoded value and where it was written."""

    value: Any
    span: Span


@dataclass(frozen=True)
class Stmt:
    """One statement: its keyword, its span and its values."""

    kind: str
    span: Span
    vals: tuple[Any, ...] = ()


@dataclass
class Built:
    """One file, built: see the module docstring."""

    spec: Spec
    spans: dict[Key, Span] = field(default_factory=dict)
    anchors: list[tuple[Span, Key]] = field(default_factory=list)
    includes: list[tuple[str, Span]] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)


class Recorder(Protocol):
    file: str
    diags: list[Diagnostic]
    spans: dict[Key, Span]
    anchors: list[tuple[Span, Key]]

    def error(self, span: Span, message: str, hint: str | None = None,
              severity: str = "error") -> None: ...

    def note(self, node: Any, label: str, span: Span) -> None: ...

    def anchor(self, node: Any, label: str, span: Span) -> None: ...

    def once(self, seen: dict[str, Span], stmt: Stmt, where: str) -> bool: ...


_HEAD_HINT = 'add `subject "..." relation NAME -> "new"` or `prompt "..." -> "new"`'


def _head(b: Recorder, name: str, name_span: Span, items: list[Stmt]) -> Stmt | None:
    heads = [s for s in items if s.kind in ("triple", "prompt")]
    if not heads:
        b.error(name_span, f"edit `{name}` declares no change", _HEAD_HINT)
        return None
    for extra in heads[1:]:
        if extra.kind != heads[0].kind:
            b.error(extra.span, "an edit is a triple (`subject ... relation ...`) or a "
                    "free-form `prompt`, not both", "split it into two edits")
        else:
            b.error(extra.span, f"edit `{name}` already declares its change at line "
                    f"{heads[0].span.line}", "one change per edit: split it into two edits")
    return heads[0]


def assemble_edit(b: Recorder, name: str, name_span: Span, items: list[Stmt],
                  span: Span) -> TripleEdit | PromptEdit | None:
    """Build the edit called ``name`` from its block's statements (None if it has no change)."""
    head = _head(b, name, name_span, items)
    kw: dict[str, Any] = {"name": name}
    notes: list[tuple[str, Span]] = [("name", name_span)]
    lists: dict[str, list[Val]] = {"scope": [], "preserve": [], "portability": []}
    seen: dict[str, Span] = {}
    for st in items:
        if st.kind in lists:
            lists[st.kind].extend(st.vals)
        elif st.kind in ("subject", "old"):
            if head is not None and head.kind == "triple":
                hint = ('write the old object in the head: "old" -> "new"' if st.kind == "old"
                        else "the triple already names its subject")
                b.error(st.span, f"`{st.kind}` on its own line is for prompt edits", hint)
            elif b.once(seen, st, f"in edit `{name}`"):
                kw[st.kind] = st.vals[0].value
                notes.append((st.kind, st.vals[0].span))
        elif st.kind == "expect" and b.once(seen, st, f"in edit `{name}`") and st.vals[0]:
            kw["expect_reversal"] = True
            notes.append(("expect_reversal", st.span))
    if head is None:
        return None
    if head.kind == "triple":
        subject, relation, old, new = head.vals
        parts = {"subject": subject, "relation": relation, "old": old, "new": new}
    else:
        prompt, target = head.vals
        parts = {"prompt": prompt, "target": target}
    for label, val in parts.items():
        if val is not None:
            kw[label] = val.value
            notes.append((label, val.span))
    for label, vals in lists.items():
        if vals:
            kw[label] = tuple(v.value for v in vals)
            notes.extend((f"{label}.{i}", v.span) for i, v in enumerate(vals))
    cls = TripleEdit if head.kind == "triple" else PromptEdit
    node = cls(span=span, **kw)
    for label, at in notes:
        b.note(node, label, at)
    return node


_SETTINGS = ("model", "seed", "order", "method", "weights", "budget", "chat")


def _method_hint(b: Recorder, method: Stmt | None, frozen: bool) -> MethodHint:
    kw: dict[str, Any] = {}
    notes: list[tuple[str, Span]] = []
    if method is not None:
        name, *options = method.vals
        kw["method"] = name.value if name is not None else "auto"
        if name is not None:
            notes.append(("method", name.span))
        seen: dict[str, Span] = {}
        for opt in options:
            if b.once(seen, opt, "in `method`"):
                kw[opt.kind] = opt.vals[0].value
                notes.append((opt.kind, opt.vals[0].span))
    if frozen:
        kw["frozen"] = True
    hint = MethodHint(span=method.span if method else None, **kw)
    for label, at in notes:
        b.note(hint, label, at)
    return hint


def _chat(b: Recorder, st: Stmt) -> ChatSetting | None:
    """``chat on [system "..."]`` -> a ChatSetting; ``chat off`` -> None (written, so the
    formatter keeps it)."""
    mode, system = st.vals
    if mode.value == "off":
        return None
    setting = ChatSetting(span=st.span, **({"system": system.value} if system else {}))
    if system is not None:
        b.note(setting, "system", system.span)
    return setting


def assemble_spec(b: Recorder, stmts: list[Stmt], span: Span) -> Built:
    """Build a file's own Spec (includes are listed, not loaded)."""
    settings: dict[str, Stmt] = {}
    seen: dict[str, Span] = {}
    groups: dict[str, list[Any]] = {"relation": [], "edit": [], "claim": [], "include": []}
    for st in stmts:
        if st.kind in _SETTINGS:
            if b.once(seen, st, "statement"):
                settings[st.kind] = st
        elif st.kind == "include":
            groups["include"].append(st)
        else:
            groups[st.kind].append(st.vals[0])
    kw: dict[str, Any] = {}
    if "model" in settings:
        kw["model"] = settings["model"].vals[0].value
    if "seed" in settings:
        kw["seed"] = settings["seed"].vals[0].value
    budget = settings.get("budget")
    if budget is not None and budget.vals[0] is not None and budget.vals[0].value is not None:
        kw["budget"] = float(budget.vals[0].value)
    order = settings.get("order")
    if order is not None and order.vals[0] is not None:
        kw["order"] = order.vals[0].value
    chat = settings.get("chat")
    if chat is not None and chat.vals[0] is not None:
        kw["chat"] = _chat(b, chat)
    weights = settings.get("weights")
    frozen = weights is not None and weights.vals[0] is not None
    if "method" in settings or frozen:
        kw["method"] = _method_hint(b, settings.get("method"), frozen)
    for key, label in (("relation", "relations"), ("edit", "edits"), ("claim", "claims")):
        if groups[key]:
            kw[label] = tuple(groups[key])
    includes: list[Stmt] = groups["include"]
    if includes:
        kw["includes"] = tuple(st.vals[0].value for st in includes)
    spec = Spec(span=span, source=b.file if b.file != "<string>" else None, **kw)
    for name, st in settings.items():
        b.anchor(spec, name, st.span)
        if st.vals and isinstance(st.vals[0], Val):
            b.note(spec, name, st.vals[0].span)
    for i, st in enumerate(includes):
        b.anchor(spec, f"include.{i}", st.span)
        b.note(spec, f"includes.{i}", st.vals[0].span)
    return Built(spec=spec, spans=b.spans, anchors=b.anchors,
                 includes=[(st.vals[0].value, st.vals[0].span) for st in includes],
                 diagnostics=b.diags)
