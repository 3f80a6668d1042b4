"""Pass ``share_scope``: a wording declared for one edit of a relation is tried on its siblings.

An edit's ``scope`` prompt that names the edit's subject once states a way of
asking the relation ("Danielle Darrieux spoke the language"). Asked about
another subject of the same relation, the same wording must give that
subject's new answer too; the spec simply did not write it down there. For the
locate-then-edit methods (ROME, MEMIT, AlphaEdit: their target value is fitted
on the edit's in-scope prompts) this pass adds, to every triple edit, up to
:data:`SHARE` wordings declared on *other* edits of its relation, rendered with
its own subject: the wordings most edits declared first, ties in spec order.

What is borrowed is the wording, not the declaration:

* only ``scope`` prompts of triple edits that contain the edit's subject once
  and neither its old nor its new object (a prompt that names the answer is
  about that fact, not about the relation);
* the text before the last sentence break ahead of the subject is dropped (a
  lead-in such as "He was born in 1950. " is context, not wording);
* a wording the edit already has (its prompt, its relation's paraphrases, its
  own scope) is not added twice.

Borrowed prompts reach the objective only. Claims are scored on what the spec
declares, and the verifier counts a borrowed prompt as one the compiler saw
(it is in the plan's ``scope``), so a held-out prompt that happens to equal
one is reported as declared, never as held out. Each step lists what its edits
borrowed in its reasons (``kmec plan --explain``); the plan's ``borrowed``
field on each request names them.
"""

from __future__ import annotations

import re
from collections import Counter

from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft
from kmec.spec import TripleEdit

# Wordings borrowed per edit. Each borrowed prompt is one more row, under every
# context prefix, in the edit's target-value optimisation (a scope prompt costs
# about as much as the edit prompt). Chosen on CounterFact P103 records 0..29
# (BENCHMARKS.md, "Compile to the claims").
SHARE = 2

# a sentence ends at . ! ? (optionally closed by a quote or bracket) and a space, or at a newline
_BREAK = re.compile(r"[.!?][\"')\]]?\s+|\n")


def wording(prompt: str, subject: str, old: str | None, new: str) -> tuple[str, str] | None:
    """The wording of a scope prompt as ``(before, after)`` the subject, or None when it is
    not a wording of the relation (the subject not there exactly once, or an object named).

    >>> wording("He was born in 1950. Danielle Darrieux spoke the language", "Danielle Darrieux",
    ...         "French", "English")
    ('', ' spoke the language')
    >>> wording("The mother tongue of Go Hyeon-jeong is", "Go Hyeon-jeong", None, "French")
    ('The mother tongue of ', ' is')
    >>> wording("Paris is the capital of France", "France", "Paris", "Lyon") is None
    True
    """
    if prompt.count(subject) != 1:
        return None
    low = prompt.casefold()
    if any(o and o.casefold() in low for o in (old, new)):
        return None
    at = prompt.index(subject)
    head = _BREAK.split(prompt[:at])[-1]
    return head, prompt[at + len(subject):]


def share_scope(draft: Draft, facts: ModelFacts) -> Draft:
    """Add up to :data:`SHARE` sibling wordings to each triple edit's scope (keyed backends).

    >>> from kmec.planner.draft import example_backends, example_facts
    >>> from kmec.planner.passes.resolve import resolve
    >>> from kmec.planner.passes.choose_backend import choose_backend
    >>> from kmec.spec import Relation, Spec, TripleEdit
    >>> rel = Relation(name="lang", prompt="The mother tongue of {{ subject }} is")
    >>> spec = Spec(relations=(rel,), edits=(
    ...     TripleEdit(name="a", subject="Ann", relation="lang", new="Welsh", scope=("Ann spoke",)),
    ...     TripleEdit(name="b", subject="Bo", relation="lang", new="Dutch",
    ...                scope=("Fact. Bo, a native",))))
    >>> d = choose_backend(resolve(Draft(spec=spec, backends=example_backends()), example_facts()),
    ...                    example_facts())
    >>> d = share_scope(d, example_facts())
    >>> [(e.request.scope, e.request.borrowed) for e in d.edits]
    [(('Ann spoke', 'Ann, a native'), ('Ann, a native',)), (('Fact. Bo, a native', 'Bo spoke'), ('Bo spoke',))]
    """
    if SHARE <= 0 or draft.backend is None or not draft.info(draft.backend).keyed:
        return draft
    spec_edits = {e.name: e for e in draft.spec.edits}
    triples = [(d, spec_edits[d.source]) for d in draft.edits
               if isinstance(spec_edits.get(d.source), TripleEdit)]
    own: dict[str, list[tuple[str, str]]] = {}
    by_relation: dict[str, Counter[tuple[str, str]]] = {}
    for _, e in triples:
        assert isinstance(e, TripleEdit)
        mine = [w for p in e.scope if (w := wording(p, e.subject, e.old, e.new)) is not None]
        own[e.name] = list(dict.fromkeys(mine))
        by_relation.setdefault(e.relation, Counter()).update(own[e.name])
    edits = list(draft.edits)
    borrowing = 0
    for i, d in enumerate(edits):
        e = spec_edits.get(d.source)
        if not isinstance(e, TripleEdit):
            continue
        have = {d.request.prompt, *d.request.scope}
        picked: list[str] = []
        # Counter keeps first-insertion (spec) order and sorted() is stable: ties stay in it
        for (head, tail), _ in sorted(by_relation[e.relation].items(), key=lambda kv: -kv[1]):
            prompt = f"{head}{e.subject}{tail}"
            if (head, tail) in own[e.name] or prompt in have:
                continue  # the edit's own wording (its siblings may share it), or one it has
            picked.append(prompt)
            have.add(prompt)
            if len(picked) == SHARE:
                break
        if picked:
            req = d.request.model_copy(update={"scope": (*d.request.scope, *picked),
                                               "borrowed": tuple(picked)})
            edits[i] = d.model_copy(update={"request": req})
            borrowing += 1
    if not borrowing:
        return draft
    because = (f"{borrowing} edit(s) borrow up to {SHARE} scope wording(s) that other edits of "
               "their relation declare, rendered with their own subject, into the target-value "
               "objective only: claims are scored on the declared prompts, and the verifier "
               "counts a borrowed prompt as seen by the compiler (each edit's `borrowed`)")
    return draft.update(edits=tuple(edits)).note("share scope wordings", because)
