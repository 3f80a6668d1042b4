"""Pass ``resolve``: edits rendered into the requests backends receive."""

from __future__ import annotations

import pytest

from kmec.errors import PlanError
from kmec.planner import plan
from kmec.spec import Relation, Spec
from tests.planner.helpers import kz, make_spec, prompt_edit, triple


def only_edit(p):
    (step,) = p.steps
    return step.edits[0]


def test_triple_edit_renders_prompt_scope_targets_and_subject(registry, smol):
    e = only_edit(plan(make_spec(kz(scope=("Kazakhstan has its capital in",))), smol,
                       backends=registry))
    assert e.name == "kazakhstan"
    assert e.prompt == "The capital of Kazakhstan is"
    assert e.subject == "Kazakhstan"
    assert e.target_new == "Nur-Sultan" and e.target_old == "Astana"
    assert e.scope == ("Kazakhstan's capital city is", "Kazakhstan has its capital in")
    assert e.inverse is False


def test_scope_drops_repeats_and_the_edit_prompt_itself(registry, smol):
    e = only_edit(plan(make_spec(kz(scope=("Kazakhstan's capital city is",
                                           "The capital of Kazakhstan is"))),
                       smol, backends=registry))
    assert e.scope == ("Kazakhstan's capital city is",)


def test_prompt_edit_is_used_as_written(registry, smol):
    spec = make_spec(prompt_edit("messi", "The 2022 World Cup was won by", "Argentina",
                                 old="France", scope=("In 2022 the World Cup went to",)))
    e = only_edit(plan(spec, smol, backends=registry))
    assert (e.prompt, e.target_new, e.target_old, e.subject) == (
        "The 2022 World Cup was won by", "Argentina", "France", None)
    assert e.scope == ("In 2022 the World Cup went to",)


def test_unknown_relation_is_a_plan_error_with_a_suggestion(registry, smol):
    with pytest.raises(PlanError) as e:
        plan(make_spec(triple("x", "France", "Paris", relation="capitol")), smol,
             backends=registry)
    assert "uses relation 'capitol', which the spec does not declare" in str(e.value)
    assert e.value.hint == "did you mean 'capital'?"


def test_subject_must_appear_in_the_rendered_prompt(registry, smol):
    rel = Relation(name="odd", prompt="The capital is")
    spec = Spec(relations=(rel,), edits=(triple("x", "France", "Paris", relation="odd"),))
    with pytest.raises(PlanError, match="does not contain the subject 'France'"):
        plan(spec, smol, backends=registry)


def test_prompt_edit_subject_must_be_in_its_prompt(registry, smol):
    spec = make_spec(prompt_edit("m", "The 2022 World Cup was won by", "Argentina",
                                 subject="Euro"))
    with pytest.raises(PlanError, match="subject 'Euro' does not occur in its prompt"):
        plan(spec, smol, backends=registry)


def test_duplicate_edit_names_are_refused(registry, smol):
    with pytest.raises(PlanError, match="two edits are called 'kazakhstan'"):
        plan(make_spec(kz(), kz()), smol, backends=registry)


def test_template_errors_become_plan_errors_naming_the_edit(registry, smol):
    rel = Relation(name="bad", prompt="The capital of {{ subjekt }} is")
    spec = Spec(relations=(rel,), edits=(triple("x", "France", "Paris", relation="bad"),))
    with pytest.raises(PlanError) as e:
        plan(spec, smol, backends=registry)
    assert str(e.value).startswith("edit 'x' (relation 'bad') prompt: template uses an undefined")


def test_filters_in_templates_render(registry, smol):
    rel = Relation(name="lower", prompt="Where is {{ subject | lower }}? In")
    spec = Spec(relations=(rel,), edits=(triple("x", "paris", "France", relation="lower"),))
    assert only_edit(plan(spec, smol, backends=registry)).prompt == "Where is paris? In"
