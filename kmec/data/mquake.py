"""MQuAKE (Zhong et al. 2023) multi-hop cases -> spec.

Contents:
    looks_like()   whether a record is an MQuAKE case
    read()         cases -> triple edits with multi-hop portability probes on a Builder

A case edits several facts of a chain (``requested_rewrite``: ROME-style
``{}`` templates) and asks multi-hop ``questions`` whose answer becomes
``new_answer``. Each rewrite is a triple edit ``mq_<case_id>_<j>`` of a relation
declared once per ``(relation_id, template)``; its ``question`` is in scope.
The multi-hop questions are portability probes of the edit that produces
``new_answer`` (the chain's last hop). Hops of the original chain that no edit
changes (``single_hops``) must still hold: their cloze and question are
preserve prompts; so are unedited hops of the new chain.

Cases share edits (MQuAKE reuses facts across cases): a shared edit is written
once and later cases add their prompts to it. A case one of whose edits
contradicts an edit already imported is dropped whole, since its multi-hop
answer could not hold in the same batch. Scored with the ``token`` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kmec.data.common import Builder, EditDraft, field, format_template
from kmec.grammar.templates import render


def looks_like(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is an MQuAKE case."""
    return isinstance(record.get("requested_rewrite"), list) and "questions" in record


def _target(rewrite: Mapping[str, Any], key: str, where: str) -> str:
    value = field(rewrite, key, where, (dict, str))
    return value if isinstance(value, str) else field(value, "str", f"{where}.{key}")


def _rewrites(rec: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The case's rewrites as dicts with the filled prompt, relation and targets."""
    out = []
    for j, rw in enumerate(field(rec, "requested_rewrite", where, list)):
        at = f"{where}.requested_rewrite[{j}]"
        if not isinstance(rw, Mapping):
            continue
        subject, template = field(rw, "subject", at), field(rw, "prompt", at)
        jinja = format_template(template)
        out.append({
            "subject": subject, "rid": str(rw.get("relation_id") or "rel"), "jinja": jinja,
            "prompt": render(jinja, subject=subject) if jinja else template.replace("{}", subject),
            "new": _target(rw, "target_new", at), "old": _target(rw, "target_true", at),
            "question": rw.get("question")})
    return out


def read(records: Sequence[Mapping[str, Any]], start: int, b: Builder) -> None:
    """Add the cases ``records`` (the first is record number ``start``) to ``b``."""
    b.title = "MQuAKE"
    b.mapping = [
        ("requested_rewrite[j]", ("a triple edit mq_<case_id>_<j>; one relation per "
                                  "(relation_id, prompt template), `{}` -> `{{ subject }}`")),
        ("requested_rewrite[j].question", "scope of that edit"),
        ("questions -> new_answer", "portability of the edit whose target is new_answer"),
        ("single_hops / new_single_hops no edit changes", "preserve (cloze and question)"),
    ]
    for i, rec in enumerate(records, start):
        where = f"record {i}"
        case = rec.get("case_id", i)
        rewrites = _rewrites(rec, where)
        clash = next((rw for rw in rewrites if _contradicts(b, rw)), None)
        if clash is not None or not rewrites:
            b.dropped.add("cases with an edit that contradicts an earlier case's edit"
                          if clash else "cases without rewrites", example=f"mq_{case}")
            continue
        drafts = [_edit(b, f"mq_{case}_{j}", rw) for j, rw in enumerate(rewrites)]
        live = [(d, rw) for d, rw in zip(drafts, rewrites, strict=True) if d is not None]
        if not live:
            continue
        new_answer = rec.get("new_answer")
        home = next((d for d, rw in reversed(live) if rw["new"] == new_answer), live[-1][0])
        questions = field(rec, "questions", where, list)
        b.portability(home, [(q, new_answer) for q in questions])
        _hops(b, home, rec, {rw["prompt"] for rw in rewrites}, {rw["question"]: d for d, rw in live})
        _lost(b, rec, len(questions))


def _contradicts(b: Builder, rw: Mapping[str, Any]) -> bool:
    first = b.existing(rw["prompt"], (rw["rid"], rw["subject"]))
    return first is not None and first.new != rw["new"]


def _edit(b: Builder, name: str, rw: Mapping[str, Any]) -> EditDraft | None:
    relation = b.relation(rw["rid"], rw["jinja"]) if rw["jinja"] else None
    draft = b.edit(name, prompt=rw["prompt"], new=rw["new"], old=rw["old"], subject=rw["subject"],
                   relation=relation, fact=(rw["rid"], rw["subject"]))
    if draft is not None and rw["question"]:
        b.scope(draft, [rw["question"]])
    return draft


def _hops(b: Builder, home: EditDraft, rec: Mapping[str, Any], edited: set[str],
          by_question: Mapping[str, EditDraft]) -> None:
    """Single hops: unedited ones are preserved; an edited hop's other cloze is in scope."""
    for key in ("single_hops", "new_single_hops"):
        for hop in rec.get(key) or ():
            if not isinstance(hop, Mapping) or hop.get("cloze") in edited:
                continue
            question, cloze = hop.get("question"), hop.get("cloze")
            if question in by_question:
                if key == "new_single_hops":
                    b.scope(by_question[question], [cloze])
                continue
            b.preserve(home, [p for p in (cloze, question) if p])
            b.lost.add("expected answers of preserved single hops (`preserve` says only that "
                       "the output must not change)", 1, example=home.name)


def _lost(b: Builder, rec: Mapping[str, Any], n_questions: int) -> None:
    b.lost.add("aliases of new_answer (a probe has one answer)",
               len(rec.get("new_answer_alias") or ()) * n_questions)
    b.lost.add("pre-edit multi-hop answers (answer, answer_alias)",
               bool(rec.get("answer")) + len(rec.get("answer_alias") or ()))
    b.lost.add("answer aliases of single hops",
               sum(len(h.get("answer_alias") or ()) for k in ("single_hops", "new_single_hops")
                   for h in rec.get(k) or () if isinstance(h, Mapping)))
    b.lost.add("`orig` Wikidata triples of the chains (metadata)", 1 if rec.get("orig") else 0)
