"""KnowEdit (Zhang et al. 2024) -> spec: its WikiData_counterfact, WikiData_recent
(RippleEdits-derived) and ZsRE files.

Contents:
    looks_like()   whether a record is a KnowEdit record
    read()         records -> edits with portability and locality on a Builder

A record edits ``prompt`` (about ``subject``) to ``target_new``; ``ground_truth``
is the old answer (absent in WikiData_recent, a list in ZsRE). ``portability``
holds ripple questions (``Logical_Generalization``, ``Reasoning``,
``Subject_Aliasing``) with the answers the edit implies; ``locality`` holds
prompts (``Relation_Specificity``, ``Forgetfulness``) whose answers must not
change. Answers come as a string, a list, or a list of alias lists.

Records have no template, so an edit is a prompt edit keyed on its subject,
except where the record supports a reversal claim: a ``Logical_Generalization``
question that contains the new target and is answered by the subject (``2041
BC follows`` -> ``29668 Ipf``; ``29668 Ipf is followed by`` -> ``2041 BC``).
Then the edit becomes a triple edit of a relation whose prompt and reverse
templates are the two prompts with the subject and the target abstracted, and
it says ``expect reversal``. Names are ``ke_<index in the file>``. Scored with
the ``token`` protocol (KnowEdit's token accuracy).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from kmec.data.common import Builder, EditDraft, answers, field, first_answer, subject_template

KEYS = ("subject", "prompt", "target_new")
_WORD = re.compile(r"[A-Za-z0-9]+")


def looks_like(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is a KnowEdit record."""
    return all(k in record for k in KEYS) and ("portability" in record or "locality" in record) \
        and "case_id" not in record


def _variant(rec: Mapping[str, Any]) -> str:
    if "rephrase_prompt" in rec:
        return "ZsRE"
    return "WikiData_counterfact" if "ground_truth" in rec else "WikiData_recent"


def read(records: Sequence[Mapping[str, Any]], start: int, b: Builder) -> None:
    """Add ``records`` (the first is record number ``start`` of the file) to ``b``."""
    b.title = f"KnowEdit ({_variant(records[0])})" if records else "KnowEdit"
    b.mapping = [
        ("prompt, subject, ground_truth -> target_new", "a prompt edit keyed on its subject"),
        ("a Logical_Generalization question answered by the subject",
         "a triple edit with a reverse template and `expect reversal`"),
        ("rephrase_prompt", "scope"),
        ("portability.* (prompt -> first answer)", "portability"),
        ("locality.* prompts", "preserve"),
    ]
    for i, rec in enumerate(records, start):
        where = f"record {i}"
        name, prompt = f"ke_{i}", field(rec, "prompt", where)
        subject, new = field(rec, "subject", where), field(rec, "target_new", where)
        old, more = first_answer(rec.get("ground_truth"))
        probes = _probes(rec)
        reverse = next((p for p in probes if _reverses(p, subject, new)), None)
        relation = _relation(b, prompt, subject, reverse[1] if reverse else None, new)
        draft = b.edit(name, prompt=prompt, new=new, old=old, subject=subject, relation=relation)
        if draft is None:
            continue
        if relation is not None and draft.relation == relation:
            draft.expect_reversal = True
            probes.remove(reverse)
        b.lost.add("further true answers (`old` holds one)", more, example=name)
        if "rephrase_prompt" in rec:
            b.scope(draft, [rec["rephrase_prompt"]])
        _portability(b, draft, probes)
        _locality(b, draft, rec)
        b.lost.add("`cond` strings (derived: old >> new || prompt)", 1 if "cond" in rec else 0)


def _probes(rec: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """(kind, prompt, answers) for every portability question of the record."""
    out = []
    groups = rec.get("portability") or {}
    for kind, items in (groups.items() if isinstance(groups, Mapping) else ()):
        for item in items or ():
            if isinstance(item, Mapping):
                out.append((kind, item.get("prompt"), item.get("ground_truth")))
    return out


def _reverses(probe: tuple[str, Any, Any], subject: str, new: str) -> bool:
    kind, prompt, gt = probe
    return kind == "Logical_Generalization" and isinstance(prompt, str) and \
        first_answer(gt)[0] == subject and prompt.count(new) == 1


def _slug(template: str) -> str:
    """A relation name from the words of its template.

    >>> _slug("Who is listed as {{ subject }} father?")
    'who_is_listed_as_father'
    """
    words = _WORD.findall(template.replace("{{ subject }}", " "))
    return "_".join(w.lower() for w in words)[:40].strip("_") or "relation"


def _relation(b: Builder, prompt: str, subject: str, reverse_prompt: str | None,
              new: str) -> str | None:
    """The relation ``prompt`` / ``reverse_prompt`` abstract to, or None if they do not."""
    if reverse_prompt is None:
        return None
    forward = subject_template(prompt, subject)
    backward = subject_template(reverse_prompt, new, "object")
    if forward is None or backward is None:
        return None
    return b.relation(_slug(forward), forward, backward)


def _portability(b: Builder, draft: EditDraft, probes: list[tuple[str, Any, Any]]) -> None:
    pairs = []
    for _kind, prompt, gt in probes:
        answer, more = first_answer(gt)
        pairs.append((prompt, answer))
        b.lost.add("further answers / aliases of portability questions (a probe has one answer)",
                   more, example=draft.name)
    b.portability(draft, pairs)


def _locality(b: Builder, draft: EditDraft, rec: Mapping[str, Any]) -> None:
    groups = rec.get("locality") or {}
    for _kind, items in (groups.items() if isinstance(groups, Mapping) else ()):
        for item in items or ():
            if not isinstance(item, Mapping):
                continue
            b.preserve(draft, [item.get("prompt")])
            b.lost.add("expected answers of locality prompts (`preserve` says only that the "
                       "output must not change)", 1 if answers(item.get("ground_truth")) else 0)
