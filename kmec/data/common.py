"""What every importer shares: reading records, building a Spec, accounting for losses.

Contents:
    Tally          counts (and a few examples) of what was left out, dropped or adjusted
    EditDraft          an edit being assembled (mutable until :meth:`Builder.spec`)
    Builder        relations and edits from records: naming, merging, conflicts, claims
    load_records() a JSON array or JSON-Lines file -> list of records
    field()        a required record field, or a KmecError naming the record
    answers()      ``"a"`` / ``["a", "b"]`` / ``[["a", "alias"], ...]`` -> list of alias lists
    format_template()  a ``str.format`` template with ``{}`` -> a jinja2 template, or None
    subject_template() a filled prompt + the text to abstract -> a jinja2 template, or None
    CLAIMS         the claims an imported spec gets (when it has something for them to check)

Importing is lossless for what the language can express. Everything else is
counted in a :class:`Tally` and written in the spec's header comment, so an
auditor can see what the spec does *not* promise (for instance, that a
neighbourhood prompt still answers "French": ``preserve`` only says its output
must not change).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from kmec.errors import KmecError
from kmec.grammar.templates import inspect, render
from kmec.spec import Claim, Probe, PromptEdit, Relation, Spec, TripleEdit

NAME_BAD = re.compile(r"[^A-Za-z0-9_]+")

# metric -> threshold. Starting points an importer writes when the spec has
# something for the metric to check; tighten them in the spec you keep.
CLAIMS: tuple[tuple[str, float], ...] = (
    ("efficacy", 0.9), ("generality", 0.7), ("locality", 0.9),
    ("portability", 0.5), ("reversal", 0.5),
)
_PROTOCOL_METRICS = ("efficacy", "generality", "portability", "reversal")
_EXAMPLES = 5  # examples kept per tally line


class Tally:
    """Ordered counts keyed by a description, with a few examples each.

    >>> t = Tally()
    >>> t.add("attribute_prompts", 10, example="cf_0")
    >>> t.add("attribute_prompts", 10, example="cf_1")
    >>> t.lines()
    ['20 attribute_prompts (e.g. cf_0, cf_1)']
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self._named: dict[str, set[str]] = {}  # every example given (for the "...")

    def add(self, what: str, n: int = 1, *, example: str | None = None) -> None:
        if n <= 0:
            return
        self.counts[what] = self.counts.get(what, 0) + n
        if example is None:
            return
        named = self._named.setdefault(what, set())
        named.add(example)
        seen = self.examples.setdefault(what, [])
        if len(seen) < _EXAMPLES and example not in seen:
            seen.append(example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def lines(self) -> list[str]:
        out = []
        for what, n in self.counts.items():
            ex = self.examples.get(what)
            more = ", ..." if ex and len(self._named[what]) > len(ex) else ""
            out.append(f"{n} {what}" + (f" (e.g. {', '.join(ex)}{more})" if ex else ""))
        return out


@dataclass
class EditDraft:
    """An edit being assembled from one or more records (same prompt, same target)."""

    name: str
    prompt: str  # the filled edit prompt
    new: str
    old: str | None = None
    subject: str | None = None
    relation: str | None = None  # set: a triple edit of this relation
    expect_reversal: bool = False
    scope: list[str] = dc_field(default_factory=list)
    preserve: list[str] = dc_field(default_factory=list)
    portability: list[tuple[str, str]] = dc_field(default_factory=list)

    def build(self) -> TripleEdit | PromptEdit:
        lists: dict[str, Any] = {
            "scope": tuple(self.scope), "preserve": tuple(self.preserve),
            "portability": tuple(Probe(prompt=p, target=t) for p, t in self.portability),
            "expect_reversal": self.expect_reversal}
        if self.relation is not None and self.subject is not None:
            return TripleEdit(name=self.name, subject=self.subject, relation=self.relation,
                              old=self.old, new=self.new, **lists)
        return PromptEdit(name=self.name, prompt=self.prompt, target=self.new, old=self.old,
                          subject=self.subject, **lists)


def _blank(text: object) -> bool:
    return not isinstance(text, str) or not text.strip()


def identifier(text: str, *, prefix: str = "r") -> str:
    """``text`` made a valid kmec name (letters, digits, ``_``; no leading digit).

    >>> identifier("P103"), identifier("3 words here"), identifier("")
    ('P103', 'r_3_words_here', 'r')
    """
    name = NAME_BAD.sub("_", text).strip("_")
    if not name:
        return prefix
    return f"{prefix}_{name}" if name[0].isdigit() else name


class Builder:
    """Relations and edits assembled from records, and an account of what was lost.

    Edits are keyed by their filled prompt (and, for triples, by ``fact``, e.g.
    ``(relation_id, subject)``): a second record with the same key and the same
    target is merged into the first edit (its prompts are added); one with a
    different target contradicts it and is dropped (a batch cannot hold both).

    Attributes:
        title: what was read, e.g. "CounterFact (ROME format)".
        mapping: (record field, what it became) lines for the header.
        lost: what the language cannot express (left out of the spec).
        dropped: records not imported, by reason.
        adjusted: values changed to make the spec valid (blank strings, ...).
    """

    def __init__(self, protocol: str = "prob") -> None:
        self.protocol = protocol
        self.title = ""
        self.mapping: list[tuple[str, str]] = []
        self.lost, self.dropped, self.adjusted = Tally(), Tally(), Tally()
        self.records = 0
        self.relations: dict[str, Relation] = {}
        self._relation_keys: dict[tuple[str, str, str | None], str] = {}
        self.drafts: dict[str, EditDraft] = {}
        self._by_prompt: dict[str, EditDraft] = {}
        self._by_fact: dict[Any, EditDraft] = {}

    # ------------------------------------------------------------------ names

    def _unique(self, name: str, taken: Mapping[str, object]) -> str:
        if name not in taken:
            return name
        i = 2
        while f"{name}_{i}" in taken:
            i += 1
        return f"{name}_{i}"

    def relation(self, base: str, template: str, reverse: str | None = None) -> str:
        """The name of the relation with this template (declared on first use).

        ``base`` (a relation id such as ``P103``) names the first relation with
        it; later templates of the same id get ``P103_2``, ``P103_3``, ...
        """
        key = (base, template, reverse)
        if key not in self._relation_keys:
            name = self._unique(identifier(base), self.relations)
            self.relations[name] = Relation(name=name, prompt=template, reverse=reverse)
            self._relation_keys[key] = name
        return self._relation_keys[key]

    # ------------------------------------------------------------------ edits

    def edit(self, name: str, *, prompt: str, new: str, old: str | None = None,
             subject: str | None = None, relation: str | None = None,
             fact: Any = None) -> EditDraft | None:
        """Start (or merge into) the edit ``prompt -> new``; None if the record is dropped.

        Args:
            name: the edit's name (made unique if taken).
            prompt: the filled edit prompt (for triples, the rendered template).
            new, old: the target after and before the edit.
            subject: the subject (triples), or the part of the prompt it is keyed on.
            relation: a relation name from :meth:`relation` (makes a triple edit).
            fact: a key of the fact beyond its prompt, e.g. ``("P190", "Istanbul")``.
        """
        if _blank(prompt) or _blank(new):
            self.dropped.add("records with a blank edit prompt or target", example=name)
            return None
        new, old = self._trim(new, name), None if old is None else self._trim(old, name)
        if old is not None and (_blank(old) or old == new):
            self.adjusted.add("old values left out (blank, or equal to the new target)",
                              example=name)
            old = None
        if relation is None and subject is not None and (_blank(subject) or subject not in prompt):
            self.adjusted.add("subjects left out (not in the edit prompt: the edit is keyed "
                              "on the prompt's last token)", example=name)
            subject = None
        first = self.existing(prompt, fact)
        if first is not None:
            if first.new != new:
                self.dropped.add("records that contradict an earlier edit (same fact, another "
                                 "target; a batch cannot hold both)", example=name)
                return None
            self.adjusted.add("records merged into an earlier edit of the same fact "
                              "(their prompts were added to it)", example=f"{name}->{first.name}")
            if prompt != first.prompt:  # the same fact asked another way: in scope
                first.scope.append(prompt)
            return first
        draft = EditDraft(name=self._unique(identifier(name, prefix="e"), self.drafts), prompt=prompt,
                      new=new, old=old, subject=subject, relation=relation)
        self.drafts[draft.name] = draft
        self._by_prompt[prompt] = draft
        if fact:
            self._by_fact[fact] = draft
        return draft

    def _trim(self, answer: str, example: str) -> str:
        """An answer without surrounding blanks (scoring puts the space after a prompt)."""
        if answer != answer.strip():
            self.adjusted.add("answers with surrounding blanks trimmed", example=example)
        return answer.strip()

    def existing(self, prompt: str, fact: Any = None) -> EditDraft | None:
        """The edit already declared for ``prompt`` (or for ``fact``), if any."""
        return self._by_prompt.get(prompt) or (self._by_fact.get(fact) if fact else None)

    def _strings(self, values: Iterable[object], what: str, draft: EditDraft) -> list[str]:
        good = []
        for v in values:
            if _blank(v):
                self.adjusted.add(f"blank {what} left out", example=draft.name)
            else:
                good.append(str(v))
        return good

    def scope(self, draft: EditDraft, prompts: Iterable[object]) -> None:
        """Add in-scope prompts (paraphrases) to ``draft``."""
        draft.scope.extend(self._strings(prompts, "scope prompts", draft))

    def preserve(self, draft: EditDraft, prompts: Iterable[object]) -> None:
        """Add prompts whose output must not change to ``draft``."""
        draft.preserve.extend(self._strings(prompts, "preserve prompts", draft))

    def portability(self, draft: EditDraft, probes: Iterable[tuple[object, object]]) -> None:
        """Add ``(prompt, answer)`` probes that must follow the edit to ``draft``."""
        for prompt, answer in probes:
            if _blank(prompt) or _blank(answer):
                self.adjusted.add("portability probes with a blank prompt or answer left out",
                                  example=draft.name)
            else:
                draft.portability.append((str(prompt), self._trim(str(answer), draft.name)))

    # ------------------------------------------------------------------ finish

    def _tidy(self) -> None:
        """Write repeated prompts once, and keep out of ``preserve`` every prompt that
        some edit of this spec declares in scope (it is meant to move)."""
        moving: set[str] = set()
        for d in self.drafts.values():
            moving.add(d.prompt)
            moving.update(d.scope)
            moving.update(p for p, _ in d.portability)
        for d in self.drafts.values():
            n = len(d.scope) + len(d.preserve) + len(d.portability)
            d.scope = [p for p in dict.fromkeys(d.scope) if p != d.prompt]
            d.portability = list(dict.fromkeys(d.portability))
            unique = list(dict.fromkeys(d.preserve))
            d.preserve = [p for p in unique if p not in moving]
            self.adjusted.add("preserve prompts left out because an edit of this spec "
                              "changes them", len(unique) - len(d.preserve), example=d.name)
            left = len(d.scope) + len(d.preserve) + len(d.portability)
            self.adjusted.add("repeated prompts within an edit written once",
                              n - left - (len(unique) - len(d.preserve)))

    def claims(self, edits: Sequence[TripleEdit | PromptEdit]) -> tuple[Claim, ...]:
        """The :data:`CLAIMS` that have something to check in ``edits``."""
        present = {
            "efficacy": bool(edits),
            "generality": any(e.scope or (isinstance(e, TripleEdit) and
                                          self.relations[e.relation].paraphrases) for e in edits),
            "locality": any(e.preserve for e in edits),
            "portability": any(e.portability for e in edits),
            "reversal": any(e.expect_reversal for e in edits),
        }
        out = []
        for metric, threshold in CLAIMS:
            if present[metric]:
                extra = {"protocol": self.protocol} if metric in _PROTOCOL_METRICS and \
                    self.protocol != "prob" else {}
                out.append(Claim(metric=metric, threshold=threshold, **extra))
        return tuple(out)

    def spec(self, *, model: str | None = None) -> Spec:
        """The Spec of everything added so far (relations in first-use order)."""
        self._tidy()
        edits = tuple(d.build() for d in self.drafts.values())
        used = {e.relation for e in edits if isinstance(e, TripleEdit)}
        relations = tuple(r for r in self.relations.values() if r.name in used)
        extra = {"model": model} if model else {}
        return Spec(relations=relations, edits=edits, claims=self.claims(edits), **extra)


# ---------------------------------------------------------------------- records


MAX_RECORDS_BYTES = 2 << 30  # the largest public release file (zsRE train) is ~100 MB


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON array file (or a JSON-Lines file, one object a line).

    Raises:
        KmecError: the file is missing, not JSON, or not a list of objects.
    """
    from kmec.grammar.files import FileRefused, read_text_file

    p = Path(path)
    try:  # a regular file, bounded (a device or FIFO named by mistake cannot hang or fill memory)
        text = read_text_file(p, limit=MAX_RECORDS_BYTES, what="records file")
    except FileNotFoundError:
        raise KmecError(f"{p}: no such file") from None
    except FileRefused as e:
        raise KmecError(e.message, hint=e.hint) from None
    except (OSError, UnicodeDecodeError) as e:
        raise KmecError(f"{p}: cannot read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data = _json_lines(text, p, e)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise KmecError(f"{p}: expected a JSON array of records (objects)",
                        hint="importers read the datasets' public release files")
    return data


def _json_lines(text: str, p: Path, first: json.JSONDecodeError) -> list[Any]:
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        raise KmecError(f"{p}: not JSON: {first.msg} at line {first.lineno}, "
                        f"column {first.colno}") from None


def field(record: Mapping[str, Any], key: str, where: str,
          kind: type | tuple[type, ...] = str) -> Any:
    """``record[key]``, checked to be a ``kind``.

    Raises:
        KmecError: the key is missing or holds another type; the message names
            the record (``where``) and the keys it does have.
    """
    if key not in record:
        raise KmecError(f"{where}: missing field {key!r}",
                        hint=f"the record has {', '.join(map(repr, record)) or 'no fields'}; "
                        "is this the right dataset?")
    value = record[key]
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise KmecError(f"{where}: field {key!r} is {type(value).__name__}, expected "
                        f"{' or '.join(k.__name__ for k in kinds)}")
    return value


def answers(value: Any) -> list[list[str]]:
    """Answers in any of the releases' shapes, as a list of alias lists (blanks removed).

    >>> answers("Paris"), answers(["Paris", "Lyon"]), answers([["Paris", "City of Light"], []])
    ([['Paris']], [['Paris'], ['Lyon']], [['Paris', 'City of Light']])
    >>> answers(None), answers("  ")
    ([], [])
    """
    if isinstance(value, str):
        return [[value]] if value.strip() else []
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        aliases = [item] if isinstance(item, str) else item if isinstance(item, list) else []
        aliases = [a for a in aliases if isinstance(a, str) and a.strip()]
        if aliases:
            out.append(aliases)
    return out


def first_answer(value: Any) -> tuple[str | None, int]:
    """The first answer in ``value`` and how many other answers/aliases it has.

    >>> first_answer([["Paris", "City of Light"], ["Lyon"]])
    ('Paris', 2)
    """
    found = answers(value)
    if not found:
        return None, 0
    return found[0][0], sum(len(a) for a in found) - 1


# ---------------------------------------------------------------------- templates

_SENTINEL = "\x00SUBJECT\x00"


def _jinja(pieces: Sequence[str | None], var: str) -> str:
    """Literal pieces and variable slots (None) -> jinja2 text; literals holding
    braces or ``#`` next to a brace are wrapped in ``{% raw %}`` so they stay text."""
    out = []
    for piece in pieces:
        if piece is None:
            out.append(f"{{{{ {var} }}}}")
        elif "{" in piece or "}" in piece:
            out.append("{% raw %}" + piece + "{% endraw %}")
        else:
            out.append(piece)
    return "".join(out)


def _checked(template: str, var: str, expect: str) -> str | None:
    """``template`` if it parses and renders ``expect`` with the sentinel, else None."""
    info = inspect(template)
    if info.error is not None or info.variables != {var}:
        return None
    values = {"subject": _SENTINEL} if var == "subject" else \
        {"subject": "", "object": _SENTINEL}
    try:
        return template if render(template, **values) == expect else None
    except KmecError:
        return None


def format_template(template: str) -> str | None:
    """A ROME-style ``"... {} ..."`` template as a jinja2 one, or None if it is not one.

    ``{}`` (or ``{0}``) becomes ``{{ subject }}``; ``{{``/``}}`` are literal braces,
    as in ``str.format``.

    >>> format_template("The mother tongue of {} is")
    'The mother tongue of {{ subject }} is'
    >>> format_template("{} uses {{braces}}")
    '{{ subject }}{% raw %} uses {braces}{% endraw %}'
    >>> format_template("no slot"), format_template("{} and {}"), format_template("{x}")
    (None, None, None)
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return None
    pieces: list[str | None] = []
    slots = 0
    for literal, name, spec, conversion in parts:
        if pieces and isinstance(pieces[-1], str):
            pieces[-1] += literal  # `{{` splits a literal in two
        else:
            pieces.append(literal)
        if name is None:
            continue
        if name not in ("", "0") or spec or conversion:
            return None
        pieces.append(None)
        slots += 1
    if slots != 1:
        return None
    expect = "".join(_SENTINEL if p is None else p for p in pieces)
    return _checked(_jinja(pieces, "subject"), "subject", expect)


def subject_template(prompt: str, text: str, var: str = "subject") -> str | None:
    """``prompt`` with its one occurrence of ``text`` made the variable ``var``, or None.

    >>> subject_template("2041 BC follows", "2041 BC")
    '{{ subject }} follows'
    >>> subject_template("29668 Ipf is followed by", "29668 Ipf", "object")
    '{{ object }} is followed by'
    >>> subject_template("a b a", "a") is None
    True
    """
    if not text or prompt.count(text) != 1:
        return None
    before, after = prompt.split(text)
    return _checked(_jinja([before, None, after], var), var, before + _SENTINEL + after)
