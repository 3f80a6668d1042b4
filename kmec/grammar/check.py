"""Semantic checks on a Spec: everything a grammar cannot see.

Contents:
    Locate      (node, field) -> Span: where a field of a node was written
    CHECKS      the checks, in order; each is ``(spec, ctx) -> Iterator[Diagnostic]``
    check()     run them all, collecting every problem (errors and warnings)

The checks run on any Spec, parsed or built in Python. When the spec was
parsed, ``locate`` (from the parser) points a diagnostic at the exact field
("relation capitl" rather than the whole edit); otherwise it falls back to the
node's span, or to the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmec.errors import Diagnostic, Span, did_you_mean
from kmec.grammar.files import FileRefused, find_root, read_subjects
from kmec.grammar.templates import VARIABLES, inspect, is_template
from kmec.spec import Claim, PromptEdit, Relation, Spec, TripleEdit

Locate = Callable[[Any, str], "Span | None"]
NAME = re.compile(r"[A-Za-z_](?:[A-Za-z0-9_]|-(?=[A-Za-z0-9_]))*")
WEIGHT_METHODS = ("rome", "memit", "alphaedit", "ft", "mend")


@dataclass(frozen=True)
class Ctx:
    """What the checks share: where things are, and where relative files live."""

    spec: Spec
    locate: Locate | None
    base_dir: Path | None
    root: Path | None = None  # files the spec names must lie under it

    def at(self, node: Any, field: str | None = None) -> Span:
        if field is not None and self.locate is not None:
            span = self.locate(node, field)
            if span is not None:
                return span
        span = getattr(node, "span", None) or self.spec.span
        return span or Span(file=self.spec.source or "<string>")


def _err(span: Span, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(span, message, hint)


def _warn(span: Span, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(span, message, hint, severity="warning")


def _where(span: Span | None, here: Span) -> str:
    if span is None:
        return "earlier"
    return f"at line {span.line}" if span.file == here.file else f"at {span}"


def check_names(spec: Spec, c: Ctx) -> Iterator[Diagnostic]:
    """Names are identifiers, and no relation or edit name is used twice."""
    for kind, nodes in (("relation", spec.relations), ("edit", spec.edits)):
        first: dict[str, Any] = {}
        for node in nodes:
            here = c.at(node, "name")
            if not NAME.fullmatch(node.name):
                yield _err(here, f"{node.name!r} is not a valid {kind} name",
                           "names are letters, digits, `_` and inner `-`, not starting "
                           "with a digit")
            if node.name in first:
                yield _err(here, f"duplicate {kind} name `{node.name}`",
                           f"the first is {_where(first[node.name].span, here)}; rename one")
            else:
                first[node.name] = node


_EXAMPLE = {"subject": 'write e.g. "The capital of {{ subject }} is"',
            "object": 'write e.g. "{{ object }} is the capital of"'}


def _template(c: Ctx, node: Any, field: str, text: str, role: str) -> Iterator[Diagnostic]:
    info = inspect(text)
    here = c.at(node, field)
    if info.error is not None:
        yield _err(here, f"template syntax error in {role}: {info.error}",
                   "templates use jinja2 syntax: {{ subject }}")
        return
    unknown = sorted(info.variables - set(VARIABLES))
    for var in unknown:
        hint = did_you_mean(var, VARIABLES) or "templates may use {{ subject }} and {{ object }}"
        yield _err(here, f"unknown template variable `{var}` in {role}", hint)
    must, must_not = ("object", "subject") if role == "reverse template" else ("subject", "object")
    if must not in info.variables and not unknown:
        hint = _EXAMPLE[must]
        if "{}" in text:  # the ROME / EasyEdit placeholder
            hint = (f"did you mean \"{text.replace('{}', '{{ ' + must + ' }}', 1)}\"? "
                    f"`{{}}` is the ROME/EasyEdit placeholder; kmec templates write "
                    f"{{{{ {must} }}}}")
        yield _err(here, f"the {role} does not use {{{{ {must} }}}}", hint)
    if must_not in info.variables:
        yield _err(here, f"the {role} uses {{{{ {must_not} }}}}, which is its answer",
                   "a prompt must not contain the answer it asks for")


def check_templates(spec: Spec, c: Ctx) -> Iterator[Diagnostic]:
    """Relation templates parse and use the right variables; edit prompts are plain text."""
    for rel in spec.relations:
        if rel.prompt.strip():
            yield from _template(c, rel, "prompt", rel.prompt, "prompt template")
        for i, text in enumerate(rel.paraphrases):
            if text.strip():
                yield from _template(c, rel, f"paraphrases.{i}", text, "paraphrase template")
        if rel.reverse is not None and rel.reverse.strip():
            yield from _template(c, rel, "reverse", rel.reverse, "reverse template")
    for edit in spec.edits:
        for field, text in _edit_prompts(edit):
            if is_template(text):
                yield _warn(c.at(edit, field), "template markup in an edit prompt is used as "
                            "written, not filled in", "templates belong in relation blocks")


def _edit_prompts(edit: TripleEdit | PromptEdit) -> Iterator[tuple[str, str]]:
    if isinstance(edit, PromptEdit):
        yield "prompt", edit.prompt
    for label in ("scope", "preserve"):
        for i, text in enumerate(getattr(edit, label)):
            yield f"{label}.{i}", text
    for i, probe in enumerate(edit.portability):
        yield f"portability.{i}", probe.prompt


def _triple_key(edit: TripleEdit | PromptEdit) -> tuple[str, ...]:
    if isinstance(edit, TripleEdit):
        return ("triple", edit.subject, edit.relation)
    return ("prompt", edit.prompt)


def _describe(key: tuple[str, ...]) -> str:
    return f"({key[1]}, {key[2]})" if key[0] == "triple" else f"the prompt {key[1]!r}"


def _target(edit: TripleEdit | PromptEdit) -> str:
    return edit.new if isinstance(edit, TripleEdit) else edit.target


def check_edits(spec: Spec, c: Ctx) -> Iterator[Diagnostic]:
    """Edits name known relations, change something, and do not contradict each other."""
    relations = {r.name: r for r in spec.relations}
    seen: dict[tuple[str, ...], TripleEdit | PromptEdit] = {}
    for edit in spec.edits:
        target = _target(edit)
        if isinstance(edit, TripleEdit):
            rel = relations.get(edit.relation)
            if rel is None:
                hint = did_you_mean(edit.relation, relations) or (
                    f"relations: {', '.join(relations)}" if relations
                    else "declare it: relation NAME { prompt \"...{{ subject }}...\" }")
                yield _err(c.at(edit, "relation"), f"unknown relation `{edit.relation}`", hint)
            elif edit.expect_reversal and rel.reverse is None:
                yield _err(c.at(edit, "expect_reversal"),
                           f"`expect reversal`, but relation `{rel.name}` has no reverse template",
                           f'add e.g. reverse "{{{{ object }}}} is ..." to relation {rel.name}')
        else:
            if edit.expect_reversal:
                yield _err(c.at(edit, "expect_reversal"),
                           "`expect reversal` needs a triple edit with a relation",
                           "a free-form prompt edit has no reverse direction")
            if edit.subject is not None and edit.subject.strip() and \
                    edit.subject not in edit.prompt:
                yield _err(c.at(edit, "subject"),
                           f"the subject {edit.subject!r} does not occur in the prompt",
                           "the subject names the part of the prompt the edit is keyed on")
        if edit.old is not None and edit.old == target:
            yield _err(c.at(edit, "old"), f"edit `{edit.name}` changes {target!r} to itself")
        key = _triple_key(edit)
        first = seen.get(key)
        if first is None:
            seen[key] = edit
            continue
        here = c.at(edit, "subject" if key[0] == "triple" else "prompt")
        if _target(first) != target:
            yield _err(here, f"edits `{first.name}` and `{edit.name}` both change "
                       f"{_describe(key)}: to {_target(first)!r} and to {target!r}",
                       f"`{first.name}` is {_where(first.span, here)}; keep one")
        else:
            yield _warn(here, f"edit `{edit.name}` repeats edit `{first.name}`",
                        f"`{first.name}` is {_where(first.span, here)}")


def check_claims(spec: Spec, c: Ctx) -> Iterator[Diagnostic]:
    """Thresholds are in [0, 1], options make sense, and each claim has something to check."""
    relations = [r.name for r in spec.relations]
    seen: set[str] = set()
    for claim in spec.claims:
        if not 0.0 <= claim.threshold <= 1.0:
            percent = 2.0 <= claim.threshold <= 100.0  # `>= 50`: meant as a percentage
            yield _err(c.at(claim, "threshold"),
                       f"threshold {claim.threshold:g} is outside [0, 1]",
                       f"thresholds are fractions: write >= {claim.threshold / 100:g}" if percent
                       else "thresholds are fractions: 0.95 means 95%")
        if claim.sample is not None and claim.sample < 1:
            yield _err(c.at(claim, "sample"), f"sample {claim.sample} must be at least 1")
        if claim.kl is not None and claim.kl < 0:
            yield _err(c.at(claim, "kl"), f"kl {claim.kl:g} must not be negative",
                       "kl bounds the KL divergence in nats per prompt")
        yield from _claim_scope(spec, c, claim, relations)
        dump = claim.model_dump_json()
        if dump in seen:
            yield _warn(c.at(claim), f"duplicate claim `{claim.metric}`")
        seen.add(dump)
    if spec.claims and not spec.edits:
        yield _warn(c.at(spec.claims[0]), "claims, but no edits to check them on")
    if not any(cl.metric == "reversal" for cl in spec.claims):
        for edit in spec.edits:
            if edit.expect_reversal and isinstance(edit, TripleEdit):  # prompt edits: an error
                yield _warn(c.at(edit, "expect_reversal"),
                            f"edit `{edit.name}` says `expect reversal`, but no claim checks it",
                            "add e.g. `claim reversal >= 0.9`; without it the reverse "
                            "direction is compiled (a paired inverse edit) but never verified")


HELDOUT_METRICS = ("generality", "locality", "reversal")


def _claim_scope(spec: Spec, c: Ctx, claim: Claim, relations: list[str]) -> Iterator[Diagnostic]:
    if claim.neighbours_of is not None:
        rel = spec.relation(claim.neighbours_of)
        if rel is None:
            hint = did_you_mean(claim.neighbours_of, relations) or (
                f"relations: {', '.join(relations)}" if relations else "no relation is declared")
            yield _err(c.at(claim, "neighbours_of"),
                       f"unknown relation `{claim.neighbours_of}` in `neighbours of`", hint)
        elif not rel.subjects and rel.subjects_file is None:
            yield _warn(c.at(claim, "neighbours_of"),
                        f"relation `{rel.name}` lists no subjects to sample neighbours from",
                        'add subjects "..." or subjects from "file.txt" to it')
    if claim.heldout and claim.metric not in HELDOUT_METRICS:
        yield _err(c.at(claim, "heldout"),
                   f"`heldout` does not apply to {claim.metric} claims",
                   "held-out scores exist for generality, locality and reversal (the "
                   f"{claim.metric} probes are the ones the spec declares); drop `heldout`")
    for option, value in (("neighbours of", claim.neighbours_of), ("kl", claim.kl)):
        if value is not None and claim.metric != "locality":
            field = "neighbours_of" if option == "neighbours of" else option
            yield _warn(c.at(claim, field), f"`{option}` only applies to locality claims")
    if claim.metric == "reversal" and not any(e.expect_reversal for e in spec.edits):
        yield _warn(c.at(claim, "metric"), "a reversal claim, but no edit says `expect reversal`")
    if claim.metric == "portability" and not any(e.portability for e in spec.edits):
        yield _warn(c.at(claim, "metric"), "a portability claim, but no edit has `portability`")


def check_method(spec: Spec, c: Ctx) -> Iterator[Diagnostic]:
    """Layers are distinct, increasing and not negative; budgets are positive."""
    hint = spec.method
    if spec.seed < 0:
        yield _err(c.at(spec, "seed"), f"seed {spec.seed} must not be negative")
    if spec.budget is not None and spec.budget < 0:
        yield _err(c.at(spec, "budget"), f"budget {spec.budget:g} s must not be negative",
                   "0 compiles without scoring the claims; a positive budget is seconds")
    if hint.layers is not None:
        at = c.at(hint, "layers")
        layers = hint.layers
        if not layers:
            yield _err(at, "`layers` lists no layers")
        elif any(n < 0 for n in layers):
            yield _err(at, f"negative layer {min(layers)}", "layers count from 0")
        elif len(set(layers)) != len(layers):
            dup = next(n for n in layers if layers.count(n) > 1)
            yield _err(at, f"layer {dup} is listed twice")
        elif list(layers) != sorted(layers):
            yield _err(at, "layers must be listed in increasing order",
                       f"write layers {' '.join(map(str, sorted(layers)))}")
    if hint.max_delta is not None and hint.max_delta <= 0:
        yield _err(c.at(hint, "max_delta"), f"max_delta {hint.max_delta:g} must be positive",
                   "max_delta bounds the relative weight change ‖Δ‖/‖W‖, e.g. 0.05")
    if hint.frozen and hint.method in WEIGHT_METHODS:
        yield _err(c.at(hint, "method"), f"method {hint.method} changes weights, but the spec "
                   "says `weights frozen`",
                   "use method memory or retrieval (or auto), or drop `weights frozen`")


def _strings(spec: Spec) -> Iterator[tuple[Any, str, str, str | None]]:
    """(node, field, what, value) for every string a person writes."""
    yield spec, "model", "model", spec.model
    for rel in spec.relations:
        yield rel, "prompt", "prompt", rel.prompt
        yield from ((rel, f"paraphrases.{i}", "paraphrase", p)
                    for i, p in enumerate(rel.paraphrases))
        yield rel, "reverse", "reverse template", rel.reverse
        yield from ((rel, f"subjects.{i}", "subject", s) for i, s in enumerate(rel.subjects))
        yield rel, "subjects_file", "file name", rel.subjects_file
    for edit in spec.edits:
        if isinstance(edit, TripleEdit):
            yield edit, "subject", "subject", edit.subject
            yield edit, "new", "new value", edit.new
        else:
            yield edit, "prompt", "prompt", edit.prompt
            yield edit, "target", "target", edit.target
            yield edit, "subject", "subject", edit.subject
        yield edit, "old", "old value", edit.old
        for label, what in (("scope", "scope prompt"), ("preserve", "preserve prompt")):
            yield from ((edit, f"{label}.{i}", what, s) for i, s in enumerate(getattr(edit, label)))
        for probe in edit.portability:
            yield probe, "prompt", "portability prompt", probe.prompt
            yield probe, "target", "portability answer", probe.target
    yield from ((spec, f"includes.{i}", "include path", p) for i, p in enumerate(spec.includes))


def check_strings(spec: Spec, c: Ctx) -> Iterator[Diagnostic]:
    """No string a person writes is empty (or only blanks)."""
    for node, field, what, value in _strings(spec):
        if value is None or value.strip():
            continue
        if isinstance(node, Relation) and field == "prompt" and \
                (c.locate is None or c.locate(node, field) is None) and value == "":
            yield _err(c.at(node, "name"), f"relation `{node.name}` has no prompt",
                       'add e.g. prompt "The capital of {{ subject }} is"')
        else:
            yield _err(c.at(node, field), f"empty {what}")


def check_files(spec: Spec, c: Ctx) -> Iterator[Diagnostic]:
    """``subjects from`` files exist, may be read (kmec.grammar.files) and are text."""
    if c.base_dir is None:
        return
    root = c.root if c.root is not None else find_root(c.base_dir / "spec.kmec")
    for rel in spec.relations:
        if rel.subjects_file is None or not rel.subjects_file.strip():
            continue
        at = c.at(rel, "subjects_file")
        try:
            text = read_subjects(c.base_dir, rel.subjects_file, root)
        except FileRefused as e:
            yield _err(at, e.message, e.hint)
            continue
        if not any(line.strip() for line in text.splitlines()):
            yield _warn(at, f"subjects file {rel.subjects_file!r} is empty")


CHECKS = (check_names, check_strings, check_templates, check_edits, check_claims,
          check_method, check_files)


def check(spec: Spec, *, locate: Locate | None = None,
          base_dir: str | Path | None = None, root: str | Path | None = None) -> list[Diagnostic]:
    """Every semantic problem in ``spec`` (errors and warnings), in check order.

    Args:
        spec: a parsed or hand-built Spec (with includes merged).
        locate: where a node's field was written (the parser provides it).
        base_dir: the folder relative file names are resolved in; None skips
            the file-system checks.
        root: the folder files named by the spec must lie under (default: the
            repository ``base_dir`` is in, else ``base_dir``).

    Returns:
        Diagnostics; those with ``severity == "error"`` make the spec invalid.

    >>> from kmec.spec import Relation, TripleEdit
    >>> capital = Relation(name="capital", prompt="The capital of {{ subject }} is")
    >>> edit = TripleEdit(name="k", subject="Kazakhstan", relation="captial", new="X")
    >>> spec = Spec(relations=(capital,), edits=(edit,))
    >>> [(d.message, d.hint) for d in check(spec)]
    [('unknown relation `captial`', "did you mean 'capital'?")]
    """
    ctx = Ctx(spec, locate, Path(base_dir) if base_dir is not None else None,
              Path(root) if root is not None else None)
    return [d for rule in CHECKS for d in rule(spec, ctx)]
