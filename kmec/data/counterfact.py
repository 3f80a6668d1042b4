"""CounterFact (Meng et al. 2022) -> spec, from either public release format.

Contents:
    looks_like()   whether a record is CounterFact (either format)
    read()         records -> edits on a Builder (the format is detected per file)

Two formats are read:

* **ROME** (``counterfact.json``): ``requested_rewrite`` {``prompt`` with ``{}``,
  ``relation_id``, ``subject``, ``target_new.str``, ``target_true.str``},
  ``paraphrase_prompts``, ``neighborhood_prompts``, ``attribute_prompts``,
  ``generation_prompts``. The rewrite becomes a triple edit of a relation
  declared once per ``(relation_id, template)`` (``P103``, ``P103_2``, ...).
* **EasyEdit / MEND** (``counterfact-{train,val,edit}.json``): ``prompt``
  (filled in), ``subject``, ``target_new``, ``ground_truth``, one
  ``rephrase_prompt`` and one ``locality_prompt`` with its answer. Without a
  template the rewrite becomes a prompt edit keyed on its subject.

Scored with the ``prob`` protocol (CounterFact's: the new target more probable
than the true one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kmec.data.common import Builder, EditDraft, field, format_template
from kmec.errors import KmecError
from kmec.grammar.templates import render

ROME_KEYS = ("case_id", "requested_rewrite")
FLAT_KEYS = ("case_id", "prompt", "subject", "target_new", "ground_truth")


def looks_like(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is a CounterFact record (ROME or EasyEdit format)."""
    return isinstance(record.get("requested_rewrite"), dict) or \
        all(k in record for k in FLAT_KEYS)


def read(records: Sequence[Mapping[str, Any]], start: int, b: Builder) -> None:
    """Add ``records`` (the first is record number ``start`` of the file) to ``b``."""
    if not records:
        b.title = "CounterFact"
        return
    if isinstance(records[0].get("requested_rewrite"), dict):
        _read_rome(records, start, b)
    elif all(k in records[0] for k in FLAT_KEYS):
        _read_flat(records, start, b)
    else:
        raise KmecError(f"record {start}: not a CounterFact record",
                        hint="CounterFact records have `requested_rewrite` (ROME format) or "
                        "`prompt`, `subject`, `target_new`, `ground_truth` (EasyEdit format)")


def _target(rewrite: Mapping[str, Any], key: str, where: str) -> str:
    value = field(rewrite, key, where, (dict, str))
    return value if isinstance(value, str) else field(value, "str", f"{where}.{key}")


def _read_rome(records: Sequence[Mapping[str, Any]], start: int, b: Builder) -> None:
    b.title = "CounterFact (ROME format)"
    b.mapping = [
        ("requested_rewrite", ("a triple edit (subject, relation, target_true -> target_new); "
                               "one relation per (relation_id, prompt template), "
                               "`{}` -> `{{ subject }}`")),
        ("paraphrase_prompts", "scope (must give target_new)"),
        ("neighborhood_prompts", "preserve (output must not change)"),
    ]
    for i, rec in enumerate(records, start):
        where = f"record {i}"
        rw = field(rec, "requested_rewrite", where, dict)
        name = f"cf_{rec.get('case_id', i)}"
        subject = field(rw, "subject", f"{where}.requested_rewrite")
        template, rid = field(rw, "prompt", where), str(rw.get("relation_id") or "rel")
        new, old = _target(rw, "target_new", where), _target(rw, "target_true", where)
        draft = _rewrite(b, name, template, rid, subject, new, old)
        if draft is None:
            continue
        b.scope(draft, rec.get("paraphrase_prompts") or ())
        neighbours = list(rec.get("neighborhood_prompts") or ())
        b.preserve(draft, neighbours)
        b.lost.add("expected answers of neighborhood_prompts (target_true; `preserve` says "
                   "only that the output must not change)", len(neighbours))
        b.lost.add("attribute_prompts (other subjects whose true answer is target_new)",
                   len(rec.get("attribute_prompts") or ()))
        b.lost.add("generation_prompts (free generation; no expected answer)",
                   len(rec.get("generation_prompts") or ()))
        ids = [k for k in ("pararel_idx",) if k in rec] + \
            [f"{t}.id" for t in ("target_new", "target_true")
             if isinstance(rw.get(t), dict) and "id" in rw[t]]
        b.lost.add("Wikidata / ParaRel ids (pararel_idx, target ids; metadata)", len(ids))


def _rewrite(b: Builder, name: str, template: str, rid: str, subject: str, new: str,
             old: str) -> EditDraft | None:
    """A triple edit when ``template`` has one ``{}``; else a prompt edit of the filled text."""
    jinja = format_template(template)
    if jinja is not None:
        rel = b.relation(rid, jinja)
        return b.edit(name, prompt=render(jinja, subject=subject), new=new, old=old,
                      subject=subject, relation=rel, fact=(rid, subject))
    b.adjusted.add("rewrites without a usable `{}` template written as prompt edits",
                   example=name)
    prompt = template.replace("{}", subject) if "{}" in template else template
    return b.edit(name, prompt=prompt, new=new, old=old, subject=subject, fact=(rid, subject))


def _read_flat(records: Sequence[Mapping[str, Any]], start: int, b: Builder) -> None:
    b.title = "CounterFact (EasyEdit / MEND format)"
    b.mapping = [
        ("prompt, subject, ground_truth -> target_new",
         ("a prompt edit keyed on its subject (the format has no template or relation id)")),
        ("rephrase_prompt", "scope"),
        ("locality_prompt", "preserve"),
    ]
    for i, rec in enumerate(records, start):
        where = f"record {i}"
        name = f"cf_{rec.get('case_id', i)}"
        draft = b.edit(name, prompt=field(rec, "prompt", where),
                       new=field(rec, "target_new", where), old=field(rec, "ground_truth", where),
                       subject=field(rec, "subject", where))
        if draft is None:
            continue
        b.scope(draft, [rec.get("rephrase_prompt")] if "rephrase_prompt" in rec else ())
        if "locality_prompt" in rec:
            b.preserve(draft, [rec["locality_prompt"]])
            b.lost.add("expected answers of locality_prompt (locality_ground_truth; `preserve` "
                       "says only that the output must not change)",
                       1 if rec.get("locality_ground_truth") else 0)
