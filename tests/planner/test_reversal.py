"""Reversal claims add a paired inverse edit, grouped like any other edit."""

from __future__ import annotations

import pytest

from kmec.errors import PlanError
from kmec.planner import plan
from kmec.spec import Relation, Spec
from tests.planner.helpers import kz, make_spec, prompt_edit, reasons_text, triple


def test_inverse_edit_request(registry, smol):
    p = plan(make_spec(kz(expect_reversal=True)), smol, backends=registry)
    fwd, inv = (s.edits[0] for s in p.steps)
    assert fwd.inverse is False
    assert inv.name == "kazakhstan~reverse"
    assert inv.prompt == "Nur-Sultan is the capital of"
    assert inv.target_new == "Kazakhstan"
    assert inv.subject == "Nur-Sultan"
    assert inv.inverse is True and inv.target_old is None and inv.scope == ()


def test_single_edit_with_reversal_stays_rome_with_two_steps(registry, smol):
    p = plan(make_spec(kz(expect_reversal=True)), smol, backends=registry)
    assert [s.id for s in p.steps] == ["s01-rome", "s02-rome"]
    assert ("edit 'kazakhstan' expects reversal: edits teach one direction only, so the inverse "
            "'Nur-Sultan is the capital of' -> 'Kazakhstan' is inserted as its own edit") in \
        reasons_text(p.steps[1])
    assert "pair inverse edit" not in reasons_text(p.steps[0])
    assert "declare `expect reversal`; each gets a paired inverse edit" in reasons_text(p)


def test_batch_keeps_inverse_right_after_its_edit(registry, smol):
    spec = make_spec(kz(expect_reversal=True), triple("fr", "France", "Lyon"))
    (step,) = plan(spec, smol, backends=registry).steps
    assert [e.name for e in step.edits] == ["kazakhstan", "kazakhstan~reverse", "fr"]
    assert "pair inverse edit kazakhstan~reverse" in reasons_text(step)


def test_sequence_puts_inverse_in_the_next_step(registry, smol):
    spec = make_spec(kz(expect_reversal=True), triple("fr", "France", "Lyon"), order="sequence")
    p = plan(spec, smol, backends=registry)
    assert [s.edits[0].name for s in p.steps] == ["kazakhstan", "kazakhstan~reverse", "fr"]


def test_reversal_without_reverse_template_is_refused(registry, smol):
    spec = make_spec(triple("fr", "France", "French", relation="language", expect_reversal=True))
    with pytest.raises(PlanError) as e:
        plan(spec, smol, backends=registry)
    assert "its relation declares no `reverse` template" in str(e.value)
    assert "reverse" in e.value.hint


def test_reversal_on_free_form_edit_is_refused(registry, smol):
    spec = make_spec(prompt_edit("m", "The 2022 World Cup was won by", "Argentina",
                                 subject="World Cup", expect_reversal=True))
    with pytest.raises(PlanError, match="it is a free-form edit, which has no relation"):
        plan(spec, smol, backends=registry)


def test_reverse_template_without_object_keys_on_last_token(registry, smol):
    rel = Relation(name="r", prompt="{{ subject }} lies in", reverse="The country holding it is")
    spec = Spec(relations=(rel,), edits=(triple("x", "Paris", "Italy", relation="r",
                                                expect_reversal=True),))
    inv = plan(spec, smol, backends=registry).steps[1].edits[0]
    assert inv.subject is None and inv.target_new == "Paris"


def test_inverse_edits_do_not_tip_one_edit_into_a_batch(registry, smol):
    p = plan(make_spec(kz(expect_reversal=True)), smol, backends=registry)
    assert {s.backend for s in p.steps} == {"rome"}
