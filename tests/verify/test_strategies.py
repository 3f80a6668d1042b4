"""Hypothesis neighbourhoods: deterministic samples, exclusion, shrinking, replay."""

from __future__ import annotations

from hypothesis.database import InMemoryExampleDatabase

from kmec.spec import Claim
from kmec.verify.claims import build_cases, in_scope
from kmec.verify.strategies import (
    NeighbourSpace,
    minimal_failure,
    neighbour_space,
    replay,
    sample,
)
from tests.verify.conftest import make_plan, make_spec

SPACE = NeighbourSpace(
    templates=("The capital of {{ subject }} is", "{{ subject }}'s capital is"),
    subjects=("Spain", "Italy", "Peru", "Chile"),
    subject_prompts=("The language of France is",),
    questions=("Two plus two equals",),
    sentences=("The river rises in a range of low hills and flows north.",),
    exclude=frozenset({"The capital of Italy is"}),
)


def test_sample_is_deterministic_and_excludes_in_scope_prompts():
    a = sample(SPACE, 40, key="k", seed_value=7)
    assert a == sample(SPACE, 40, key="k", seed_value=7)
    assert a != sample(SPACE, 40, key="k", seed_value=8)
    prompts = {d.prompt for d in a}
    assert "The capital of Italy is" not in prompts
    assert {d.source for d in a} == {"neighbour", "subject", "question", "corpus"}
    corpus = [d.prompt for d in a if d.source == "corpus"]
    assert all(len(p.split()) >= 3 and SPACE.sentences[0].startswith(p) for p in corpus)


def test_minimal_failure_shrinks_to_the_simplest_prompt():
    db = InMemoryExampleDatabase()
    found = minimal_failure(SPACE, lambda d: "Chile" in d.prompt, 40, key="k", seed_value=1,
                            database=db)
    assert found is not None and found.prompt == "The capital of Chile is"
    corpus = minimal_failure(SPACE, lambda d: "hills" in d.prompt, 40, key="c", seed_value=1,
                             database=db)
    assert corpus.prompt == "The river rises in a range of low hills"
    assert minimal_failure(SPACE, lambda d: False, 40, key="n", seed_value=1, database=db) is None


def test_failures_are_saved_and_replayed_read_only():
    db = InMemoryExampleDatabase()
    assert replay(SPACE, db, key="k", seed_value=1) == []
    minimal_failure(SPACE, lambda d: "Chile" in d.prompt, 40, key="k", seed_value=1, database=db)
    stored = replay(SPACE, db, key="k", seed_value=1)
    assert [d.prompt for d in stored] == ["The capital of Chile is"]
    assert replay(SPACE, db, key="k", seed_value=1) == stored  # replay deleted nothing
    assert replay(SPACE, db, key="other", seed_value=1) == []


def test_neighbour_space_leaves_out_edited_subjects():
    spec = make_spec("a", "b", (Claim(metric="locality", threshold=0.9),))
    plan = make_plan(spec, "f")
    cases = build_cases(spec, plan)
    space = neighbour_space(spec, cases[0], spec.claims[0], cases, in_scope(cases))
    assert "France" not in space.subjects and "Spain" in space.subjects
    assert space.templates == ("The capital of {{ subject }} is ", "{{ subject }}'s capital is ")
    assert space.subject_prompts == ("The language of France is ",)
    assert "The capital of France is " in space.exclude
    assert space.digest == neighbour_space(spec, cases[0], spec.claims[0], cases,
                                           in_scope(cases)).digest
