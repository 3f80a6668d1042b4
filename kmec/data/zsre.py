"""zsRE question-answering edits (MEND's pre-processing) -> spec.

Contents:
    looks_like()   whether a record is a zsRE (MEND format) record
    read()         records -> prompt edits on a Builder

A record asks a question (``src``) about ``subject`` whose answer becomes
``alt``; ``answers`` are the true answers, ``rephrase`` a paraphrase, ``loc``
an unrelated Natural Questions prompt (kept with its ``nq question:`` prefix,
as the release has it) and, in EasyEdit's eval set, ``portability`` a one-hop
question whose answer follows from the edit. There is no template, so each
record is a prompt edit keyed on its subject. Names are ``zsre_<index in the
file>``. Scored with the ``token`` protocol (zsRE's token accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kmec.data.common import Builder, answers, field

KEYS = ("src", "alt", "answers")


def looks_like(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is a zsRE record in MEND's format."""
    return all(k in record for k in KEYS)


def read(records: Sequence[Mapping[str, Any]], start: int, b: Builder) -> None:
    """Add ``records`` (the first is record number ``start`` of the file) to ``b``."""
    b.title = "zsRE (MEND format)"
    b.mapping = [
        ("src, subject, answers[0] -> alt", "a prompt edit keyed on its subject"),
        ("rephrase", "scope"),
        ("loc", "preserve"),
        ("portability (New Question -> New Answer)", "portability"),
    ]
    for i, rec in enumerate(records, start):
        where = f"record {i}"
        true = answers(field(rec, "answers", where, (list, str)))
        draft = b.edit(f"zsre_{i}", prompt=field(rec, "src", where), new=field(rec, "alt", where),
                       old=true[0][0] if true else None, subject=rec.get("subject"))
        if draft is None:
            continue
        b.lost.add("further true answers (`old` holds one)", sum(len(a) for a in true[1:]),
                   example=draft.name)
        if "rephrase" in rec:
            b.scope(draft, [rec["rephrase"]])
        if "loc" in rec:
            b.preserve(draft, [rec["loc"]])
            b.lost.add("expected answers of loc prompts (loc_ans; `preserve` says only that "
                       "the output must not change)", 1 if rec.get("loc_ans") else 0)
        port = rec.get("portability")
        if isinstance(port, Mapping) and port.get("New Question"):
            b.portability(draft, [(port.get("New Question"), port.get("New Answer"))])
            b.lost.add("portability `Recalled Relation` triples (the hop used; text only)",
                       1 if port.get("Recalled Relation") else 0)
        b.lost.add("`pred` answers (the MEND base model's prediction) and `cond` strings",
                   ("pred" in rec) + ("cond" in rec))
