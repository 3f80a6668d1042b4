"""The declared locality set reaches the plan: preserve prompts and the listed neighbours of
the relations that locality claims sample, minus anything in scope or edited."""

from __future__ import annotations

import pytest

from kmec.planner import plan
from kmec.spec import Claim, Relation
from tests.planner.helpers import FACTS, fake_registry, kz, make_spec, triple


def _spec(*claims, method="memit"):
    capital = Relation(name="capital", prompt="The capital of {{ subject }} is",
                       paraphrases=("{{ subject }}'s capital city is",),
                       reverse="{{ object }} is the capital of",
                       subjects=("France", "Peru", "Kazakhstan"))
    spec = make_spec(kz(preserve=("The capital of Russia is",)),
                     triple("fr", "France", "Lyon"), method=method, claims=claims)
    return spec.model_copy(update={"relations": (capital, *spec.relations[1:])})


def test_preserve_and_declared_neighbours_are_protected():
    p = plan(_spec(Claim(metric="locality", threshold=0.9, neighbours_of="capital")),
             FACTS["smollm2"], backends=fake_registry())
    step = p.steps[0]
    # preserve first; neighbours: unedited listed subjects (Peru) under prompt and paraphrase
    assert step.protect == ("The capital of Russia is", "The capital of Peru is",
                            "Peru's capital city is")
    assert any(r.choice == "protect 3 declared prompt(s)" for r in step.reasons)


def test_without_a_locality_claim_only_preserve_is_protected():
    p = plan(_spec(), FACTS["smollm2"], backends=fake_registry())
    assert p.steps[0].protect == ("The capital of Russia is",)


@pytest.mark.parametrize("method", ["ft", "memory", "retrieval"])
def test_fine_tuning_and_the_memories_get_the_declared_locality_set(method):
    """KL anchors (ft), negatives for the radii (memory) and thresholds (retrieval)."""
    p = plan(_spec(Claim(metric="locality", threshold=0.9), method=method), FACTS["smollm2"],
             backends=fake_registry())
    assert p.steps[0].protect == ("The capital of Russia is", "The capital of Peru is",
                                  "Peru's capital city is")


def test_backends_that_do_not_read_it_get_no_protect():
    p = plan(_spec(Claim(metric="locality", threshold=0.9), method="mend"), FACTS["smollm2"],
             backends=fake_registry(), editors=("smollm2-135m",))
    assert p.steps[0].backend == "mend" and p.steps[0].protect == ()
