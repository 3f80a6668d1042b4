"""Pass ``share_scope``: scope wordings declared on one edit reach its relation's siblings."""

from __future__ import annotations

import importlib

from kmec.planner import plan
from kmec.planner.explain import explain
from kmec.spec import MethodHint, Relation, Spec, TripleEdit

# the package exports the pass function under the module's name
share_mod = importlib.import_module("kmec.planner.passes.share_scope")

LANG = Relation(name="lang", prompt="The mother tongue of {{ subject }} is")
CITY = Relation(name="city", prompt="{{ subject }} was born in")


def triple(name, subject, relation, new, **kw) -> TripleEdit:
    return TripleEdit(name=name, subject=subject, relation=relation, new=new, **kw)


def _spec(*edits, method: str = "memit", relations=(LANG, CITY)) -> Spec:
    return Spec(model="smollm2-135m", relations=relations, edits=edits,
                method=MethodHint(method=method))


def _requests(p):
    return {e.name: e for s in p.steps for e in s.edits}


def test_siblings_borrow_the_most_declared_wordings_with_their_own_subject(registry, smol):
    spec = _spec(
        triple("a", "Ann Lee", "lang", "Welsh", scope=("Ann Lee spoke the language",)),
        triple("b", "Bo Ek", "lang", "Dutch", scope=("He was born in 1950. Bo Ek, a native",)),
        triple("c", "Cy Ru", "lang", "Greek", scope=("Cy Ru, a native",)),
        triple("d", "Di Wu", "lang", "Malay"))
    reqs = _requests(plan(spec, smol, backends=registry))
    # ", a native" is declared twice (its lead-in dropped), so it comes first
    assert reqs["a"].borrowed == ("Ann Lee, a native",)
    assert reqs["a"].scope == ("Ann Lee spoke the language", "Ann Lee, a native")
    assert reqs["b"].borrowed == ("Bo Ek spoke the language",)  # its own wording is not re-added
    assert reqs["c"].borrowed == ("Cy Ru spoke the language",)
    assert reqs["d"].borrowed == ("Di Wu, a native", "Di Wu spoke the language")
    assert set(reqs["d"].borrowed) <= set(reqs["d"].scope)


def test_nothing_crosses_relations_and_answer_naming_prompts_are_not_wordings(registry, smol):
    spec = _spec(
        triple("a", "Ann Lee", "lang", "Welsh", old="English",
               scope=("Ann Lee spoke English at home, and", "Ann Lee, Ann Lee said")),
        triple("b", "Bo Ek", "lang", "Dutch"),
        triple("c", "Cy Ru", "city", "Oslo", scope=("Cy Ru came into the world in",)))
    reqs = _requests(plan(spec, smol, backends=registry))
    assert all(not r.borrowed for r in reqs.values())


def test_only_keyed_methods_borrow_and_plans_without_borrowing_keep_their_json(registry, smol):
    edits = (triple("a", "Ann Lee", "lang", "Welsh", scope=("Ann Lee spoke the language",)),
             triple("b", "Bo Ek", "lang", "Dutch"))
    for method in ("memory", "retrieval", "ft"):
        p = plan(_spec(*edits, method=method), smol, backends=registry)
        assert all(not r.borrowed for r in _requests(p).values())
        assert '"borrowed"' not in p.to_json()
    p = plan(_spec(*edits), smol, backends=registry)
    assert _requests(p)["b"].borrowed == ("Bo Ek spoke the language",)
    assert '"borrowed"' in p.to_json()
    assert any(r.choice == "share scope wordings" for r in p.reasons)


def test_share_is_bounded_and_can_be_switched_off(registry, smol, monkeypatch):
    wordings = ("{} spoke", "{}, a native", "{}, speaker of", "{} talked in")
    spec = _spec(*(triple(f"e{i}", f"Name{i} X", "lang", "Welsh",
                          scope=(w.format(f"Name{i} X"),)) for i, w in enumerate(wordings)),
                 triple("z", "Zed Q", "lang", "Dutch"))
    assert len(_requests(plan(spec, smol, backends=registry))["z"].borrowed) == share_mod.SHARE
    monkeypatch.setattr(share_mod, "SHARE", 3)
    assert len(_requests(plan(spec, smol, backends=registry))["z"].borrowed) == 3
    monkeypatch.setattr(share_mod, "SHARE", 0)
    assert not _requests(plan(spec, smol, backends=registry))["z"].borrowed


def test_explain_counts_borrowed_prompts_apart(registry, smol):
    spec = _spec(triple("a", "Ann Lee", "lang", "Welsh", scope=("Ann Lee spoke the language",)),
                 triple("b", "Bo Ek", "lang", "Dutch"))
    text = explain(plan(spec, smol, backends=registry))
    assert "b: 'The mother tongue of Bo Ek is' -> 'Dutch'" in text
    assert "+0 scope, +1 borrowed" in text and "+1 scope)" in text
