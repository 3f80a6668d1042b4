"""Spec -> canonical ``.kmec`` text (the parser's round-trip partner).

Contents:
    WIDTH          the line width lists are wrapped to
    format_spec()  a Spec -> canonical text
    format_text()  text -> canonical text with its comments kept (``kmec fmt``)

The canonical layout: settings, includes, relations, edits, then claims; one
blank line between groups and between blocks; two-space indentation; one
statement per line. A list that does not fit in :data:`WIDTH` wraps, with
continuation lines aligned under its first value: ``subjects`` are packed,
``scope`` and ``preserve`` prompts get a line each (so a diff shows the one
prompt that changed); ``paraphrase`` and ``portability`` get a statement per
value. A setting or option is written when it differs from its default or was
written in the source (pydantic's ``model_fields_set``), so ``seed 0`` stays
if you wrote it.

Invariants (tested): ``parse(format_spec(s))`` dumps like ``s``, and
``format_text`` is idempotent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kmec.grammar.assemble import Key
from kmec.grammar.comments import Comment, attach, find_comments
from kmec.grammar.literals import format_number, quote
from kmec.grammar.loader import parse_built
from kmec.spec import Claim, MethodHint, PromptEdit, Relation, Spec, TripleEdit

WIDTH = 100
INDENT = "  "


@dataclass
class _Out:
    """Lines being written, with comments placed by statement key."""

    leading: dict[Key, list[Comment]] = field(default_factory=dict)
    trailing: dict[Key, list[Comment]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def emit(self, node: object, label: str, lines: list[str], indent: str = "") -> None:
        key = (id(node), label)
        for c in self.leading.get(key, ()):
            self.lines.append(indent + c.text)
            if c.blank_after:
                self.lines.append("")
        tail = self.trailing.get(key)
        if tail:
            lines = [*lines[:-1], lines[-1] + "  " + "  ".join(c.text for c in tail)]
        self.lines.extend(lines)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")


def _fill(keyword: str, values: Iterable[str], indent: str, *, pack: bool = True) -> list[str]:
    """``keyword v1 v2 ...`` on one line if it fits in WIDTH; else wrapped, continuation
    lines aligned under v1 and packed (``pack``) or one value per line.

    >>> _fill("subjects", ['"France"', '"Japan"'], "  ")
    ['  subjects "France" "Japan"']
    >>> _fill("scope", ['"a"' * 30, '"b"' * 30], "  ", pack=False)[1].strip()
    '"b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b""b"'
    """
    values = list(values)
    head = f"{indent}{keyword} "
    one_line = head + " ".join(values)
    if len(one_line) <= WIDTH or len(values) == 1:
        return [one_line]
    pad = " " * len(head)
    if not pack:
        return [head + values[0], *(pad + v for v in values[1:])]
    lines: list[str] = []
    current = head
    for v in values:
        if current not in (head, pad) and len(current) + 1 + len(v) > WIDTH:
            lines.append(current)
            current = pad
        current = current + v if current in (head, pad) else f"{current} {v}"
    lines.append(current)
    return lines


def _layers(layers: tuple[int, ...]) -> str:
    """``3..8`` for a run of three or more consecutive layers, else the list.

    >>> _layers((3, 4, 5, 6)), _layers((4, 6)), _layers(())
    ('3..6', '4 6', '')
    """
    if len(layers) >= 3 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return " ".join(map(str, layers))


def _method_line(hint: MethodHint) -> str | None:
    written = hint.model_fields_set
    if not ({"method", "layers", "max_delta"} & written or hint.method != "auto"
            or hint.layers is not None or hint.max_delta is not None):
        return None
    parts = [f"method {hint.method}"]
    if hint.layers is not None:
        parts.append(f"layers {_layers(hint.layers)}")
    if hint.max_delta is not None:
        parts.append(f"max_delta {format_number(hint.max_delta)}")
    return " ".join(parts)


def _settings(spec: Spec, out: _Out) -> None:
    written = spec.model_fields_set
    if spec.model is not None:
        out.emit(spec, "model", [f"model {quote(spec.model)}"])
    if "seed" in written or spec.seed != 0:
        out.emit(spec, "seed", [f"seed {spec.seed}"])
    if "order" in written or spec.order != "batch":
        out.emit(spec, "order", [f"order {spec.order}"])
    method = _method_line(spec.method)
    if method is not None:
        out.emit(spec, "method", [method])
    if spec.method.frozen:
        out.emit(spec, "weights", ["weights frozen"])
    if spec.budget is not None:
        b = spec.budget
        out.emit(spec, "budget", [f"budget {int(b) if b.is_integer() else format_number(b)}"])
    if spec.chat is not None:
        system = f" system {quote(spec.chat.system)}" if spec.chat.system is not None else ""
        out.emit(spec, "chat", [f"chat on{system}"])
    elif "chat" in written:
        out.emit(spec, "chat", ["chat off"])


def _relation(rel: Relation, out: _Out) -> None:
    inner = INDENT
    out.emit(rel, "header", [f"relation {rel.name} {{"])
    if rel.prompt:  # a relation without one parses to "" (and fails its check)
        out.emit(rel, "prompt", [f"{inner}prompt {quote(rel.prompt)}"], inner)
    for i, text in enumerate(rel.paraphrases):
        out.emit(rel, f"paraphrase.{i}", [f"{inner}paraphrase {quote(text)}"], inner)
    if rel.reverse is not None:
        out.emit(rel, "reverse", [f"{inner}reverse {quote(rel.reverse)}"], inner)
    if rel.subjects:
        out.emit(rel, "subjects", _fill("subjects", map(quote, rel.subjects), inner), inner)
    if rel.subjects_file is not None:
        out.emit(rel, "subjects from", [f"{inner}subjects from {quote(rel.subjects_file)}"],
                 inner)
    out.emit(rel, "}", ["}"], inner)


def _edit(edit: TripleEdit | PromptEdit, out: _Out) -> None:
    inner = INDENT
    out.emit(edit, "header", [f"edit {edit.name} {{"])
    old = f"{quote(edit.old)} " if edit.old is not None else ""
    if isinstance(edit, TripleEdit):
        out.emit(edit, "triple", [f"{inner}subject {quote(edit.subject)} relation "
                                  f"{edit.relation} {old}-> {quote(edit.new)}"], inner)
    else:
        out.emit(edit, "prompt", [f"{inner}prompt {quote(edit.prompt)} -> "
                                  f"{quote(edit.target)}"], inner)
        if edit.subject is not None:
            out.emit(edit, "subject", [f"{inner}subject {quote(edit.subject)}"], inner)
        if edit.old is not None:
            out.emit(edit, "old", [f"{inner}old {quote(edit.old)}"], inner)
    for label in ("scope", "preserve"):
        values = getattr(edit, label)
        if values:
            out.emit(edit, label, _fill(label, map(quote, values), inner, pack=False), inner)
    for i, probe in enumerate(edit.portability):
        out.emit(edit, f"portability.{i}", [f"{inner}portability {quote(probe.prompt)} -> "
                                            f"{quote(probe.target)}"], inner)
    if edit.expect_reversal:
        out.emit(edit, "expect", [f"{inner}expect reversal"], inner)
    out.emit(edit, "}", ["}"], inner)


def _claim(claim: Claim) -> str:
    parts = [f"claim {claim.metric} >= {format_number(claim.threshold)}"]
    if claim.sample is not None:
        parts.append(f"sample {claim.sample}")
    if claim.neighbours_of is not None:
        parts.append(f"neighbours of {claim.neighbours_of}")
    if claim.kl is not None:
        parts.append(f"kl {format_number(claim.kl)}")
    if "protocol" in claim.model_fields_set or claim.protocol != "prob":
        parts.append(f"protocol {claim.protocol}")
    if claim.heldout:
        parts.append("heldout")
    return " ".join(parts)


def _write(spec: Spec, out: _Out, includes: bool) -> str:
    _settings(spec, out)
    if includes and spec.includes:
        out.blank()
        for i, path in enumerate(spec.includes):
            out.emit(spec, f"include.{i}", [f"include {quote(path)}"])
    for rel in spec.relations:
        out.blank()
        _relation(rel, out)
    for edit in spec.edits:
        out.blank()
        _edit(edit, out)
    if spec.claims:
        out.blank()
        for claim in spec.claims:
            out.emit(claim, "header", [_claim(claim)])
    while out.lines and out.lines[-1] == "":
        out.lines.pop()
    return "\n".join(out.lines) + "\n" if out.lines else ""


def format_spec(spec: Spec, *, includes: bool = True) -> str:
    """Canonical text for ``spec``.

    Args:
        spec: the Spec to write.
        includes: write ``include`` statements for ``spec.includes``. Pass False
            for a Spec whose includes were merged, to get one self-contained file.

    Returns:
        The text, ending with a newline (empty for an empty Spec).

    >>> from kmec.spec import Claim
    >>> print(format_spec(Spec(seed=1, claims=(Claim(metric="efficacy", threshold=0.99),))))
    seed 1
    <BLANKLINE>
    claim efficacy >= 0.99
    <BLANKLINE>
    """
    return _write(spec, _Out(), includes)


def format_text(text: str, *, path: str = "<string>") -> str:
    """Reformat spec text canonically, keeping its comments.

    Includes are not followed and no semantic check runs: only a file that
    does not parse is refused.

    Raises:
        SpecError: the text has syntax errors (or values the language cannot hold).

    >>> print(format_text('seed 3 # why\\nclaim efficacy>=0.9'), end="")
    seed 3  # why
    <BLANKLINE>
    claim efficacy >= 0.9
    """
    built = parse_built(text, path)
    out = _Out()
    out.leading, out.trailing, tail = attach(find_comments(text), built.anchors)
    body = _write(built.spec, out, includes=True)
    if not tail:
        return body
    lines = [] if not body else [*body.rstrip("\n").split("\n"), ""]
    for c in tail:
        lines.append(c.text)
        if c.blank_after:
            lines.append("")
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"

