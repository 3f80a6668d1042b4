"""Training records for the MEND editor, read from zsRE and CounterFact release files.

Contents:
    EditRecord      one edit: prompt -> target, an in-scope rephrase, an unrelated prompt
    read_records()  a release file -> (dataset name, records)
    split_records() seeded split into training and held-out records
    text_snippets() ordinary text from the default corpus (general-text locality rows)

The importers in :mod:`kmec.data` turn the same files into specs; training
needs the raw fields instead (and the unrelated prompt's answer, which a spec
cannot hold), so this module maps them directly, using the importers' own
record tests (``looks_like``) and field checks:

=============  ==============================  =========================  ==========================
dataset        prompt -> target                rephrase                   unrelated prompt (answer)
=============  ==============================  =========================  ==========================
zsRE (MEND)    ``src`` -> ``alt``              ``rephrase``               ``loc`` (``loc_ans``)
CounterFact    ``prompt`` filled with the      ``paraphrase_prompts[0]``  ``neighborhood_prompts[0]``
(ROME)         subject -> ``target_new.str``                              (``target_true.str``)
CounterFact    ``prompt`` -> ``target_new``    ``rephrase_prompt``        ``locality_prompt``
(EasyEdit)                                                                (``locality_ground_truth``)
=============  ==============================  =========================  ==========================

A record without an unrelated prompt borrows the next record's edit prompt
(another subject, so the edit should not change it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmec.errors import KmecError

log = logging.getLogger("kmec")


@dataclass(frozen=True)
class EditRecord:
    """One training (or held-out) edit.

    Attributes:
        prompt: the edit prompt; ``target`` follows it.
        target: the new answer.
        rephrase: an in-scope paraphrase of the prompt (None: none given).
        loc: an unrelated prompt whose output the edit must not change.
        loc_ans: the unrelated prompt's answer, scored with it when given.
        subject: the record's subject (informational).
    """

    prompt: str
    target: str
    rephrase: str | None
    loc: str
    loc_ans: str | None = None
    subject: str | None = None


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _first(value: Any) -> str | None:
    if isinstance(value, list) and value:
        return _text(value[0])
    return _text(value)


def _field(record: Mapping[str, Any], key: str, where: str, kind: type = str) -> Any:
    from kmec.data.common import field  # the importers' checked field access

    return field(record, key, where, kind)


def _zsre(rec: Mapping[str, Any], where: str) -> dict[str, Any]:
    return {"prompt": _field(rec, "src", where), "target": _field(rec, "alt", where),
            "rephrase": _text(rec.get("rephrase")), "loc": _text(rec.get("loc")),
            "loc_ans": _first(rec.get("loc_ans")), "subject": _text(rec.get("subject"))}


def _counterfact(rec: Mapping[str, Any], where: str) -> dict[str, Any]:
    rw = rec.get("requested_rewrite")
    if isinstance(rw, Mapping):
        subject = _field(rw, "subject", f"{where}.requested_rewrite")
        template = _field(rw, "prompt", f"{where}.requested_rewrite")
        new = _field(rw, "target_new", f"{where}.requested_rewrite", dict)
        true = rw.get("target_true")
        return {"prompt": template.replace("{}", subject), "target": _field(new, "str", where),
                "rephrase": _first(rec.get("paraphrase_prompts")),
                "loc": _first(rec.get("neighborhood_prompts")),
                "loc_ans": _text(true.get("str")) if isinstance(true, Mapping) else None,
                "subject": subject}
    return {"prompt": _field(rec, "prompt", where), "target": _field(rec, "target_new", where),
            "rephrase": _text(rec.get("rephrase_prompt")), "loc": _text(rec.get("locality_prompt")),
            "loc_ans": _first(rec.get("locality_ground_truth")),
            "subject": _text(rec.get("subject"))}


def read_records(path: str | Path) -> tuple[str, list[EditRecord]]:
    """Read edit records from a zsRE or CounterFact release file.

    Args:
        path: a JSON array (or JSON-Lines) file in one of the formats above.

    Returns:
        ``(dataset, records)`` with dataset ``"zsre"`` or ``"counterfact"``.

    Raises:
        KmecError: the file is missing, not JSON, empty, not one of these
            datasets, or a record lacks a required field. Records with an
            empty prompt or target are skipped with a warning.
    """
    from kmec.data import counterfact, zsre  # imported late: kmec.data loads the grammar
    from kmec.data.common import load_records

    raw = load_records(path)
    if not raw:
        raise KmecError(f"{path}: holds no records")
    if zsre.looks_like(raw[0]):
        name, convert = "zsre", _zsre
    elif counterfact.looks_like(raw[0]):
        name, convert = "counterfact", _counterfact
    else:
        raise KmecError(
            f"{path}: record 0 is neither zsRE (src, alt, answers) nor CounterFact "
            "(requested_rewrite, or prompt/subject/target_new/ground_truth)",
            hint=f"the record has {', '.join(map(repr, raw[0])) or 'no fields'}")
    fields = [convert(rec, f"{path}: record {i}") for i, rec in enumerate(raw)]
    out, blank = [], []
    for i, f in enumerate(fields):
        if not _text(f["prompt"]) or not _text(f["target"]):
            blank.append(i)
            continue
        if f["loc"] is None:
            f = {**f, "loc": fields[(i + 1) % len(fields)]["prompt"], "loc_ans": None}
        out.append(EditRecord(**f))
    if blank:
        log.warning("%s: skipped %d record(s) with an empty prompt or target (record %s)",
                    path, len(blank), ", ".join(map(str, blank[:5])))
    if not out:
        raise KmecError(f"{path}: no record has both a prompt and a target")
    return name, out


def split_records(records: Sequence[EditRecord], held_out: int, *,
                  seed: int = 0) -> tuple[list[EditRecord], list[EditRecord]]:
    """Split into (training, held-out) records: ``held_out`` records drawn with ``seed``.

    The split depends only on the records' order, their number and the seed.

    >>> recs = [EditRecord(f"p{i}", "t", None, "l") for i in range(5)]
    >>> train, held = split_records(recs, 2)
    >>> len(train), len(held), sorted({r.prompt for r in train} | {r.prompt for r in held})
    (3, 2, ['p0', 'p1', 'p2', 'p3', 'p4'])
    """
    if not 0 <= held_out < len(records):
        raise KmecError(f"cannot hold out {held_out} of {len(records)} records",
                        hint="hold out fewer records than the file has")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:held_out])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def text_snippets(n: int, *, seed: int = 0, chars: int = 120) -> list[str]:
    """``n`` snippets of ordinary prose (about ``chars`` characters, cut at a word).

    Drawn with ``seed`` from the paragraphs of kmec's default statistics corpus
    (WikiText-2 test, shipped with kmec). Training keeps the edited model's
    next-token distribution on such text unchanged, so an edit does not make
    ordinary text less likely.

    >>> a = text_snippets(3)
    >>> len(a), a == text_snippets(3), all(20 < len(t) <= 120 for t in a)
    (3, True, True)
    """
    from kmec.stats.corpus import resolve_corpus

    paragraphs = []
    for doc in resolve_corpus("default").documents():
        for para in doc.split("\n"):
            para = " ".join(para.split())
            if len(para) >= 2 * chars and not para.startswith("="):
                paragraphs.append(para[:chars].rsplit(" ", 1)[0])
    if not paragraphs:
        raise KmecError("the default corpus has no paragraphs to draw text from")
    rng = random.Random(seed)
    if n <= len(paragraphs):
        return [paragraphs[i] for i in rng.sample(range(len(paragraphs)), n)]
    return [rng.choice(paragraphs) for _ in range(n)]
