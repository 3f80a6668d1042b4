"""Method-choice policy: each rule is shown with the choice it makes and the reason it writes."""

from __future__ import annotations

import importlib

import pytest

from kmec.errors import PlanError
from kmec.planner import plan
from kmec.spec import Claim
from tests.planner.helpers import (
    FACTS,
    fake_registry,
    kz,
    make_spec,
    many,
    prompt_edit,
    reasons_text,
    triple,
)

# the package re-exports each pass function under its module's name
cb = importlib.import_module("kmec.planner.passes.choose_backend")
ge = importlib.import_module("kmec.planner.passes.group_edits")


def backends(p):
    return [s.backend for s in p.steps]


# -- 1. explicit method ----------------------------------------------------------------


def test_explicit_method_wins_over_policy(registry, smol):
    p = plan(make_spec(*many(3), method="rome"), smol, backends=registry)
    assert backends(p) == ["rome"] * 3  # policy alone would say memit
    assert "the spec says `method rome`; an explicit method always overrides" in reasons_text(p)
    assert "the spec says `method rome`" in reasons_text(p.steps[0])


def test_explicit_weight_method_refused_when_weights_frozen(registry, smol):
    with pytest.raises(PlanError) as e:
        plan(make_spec(kz(), method="rome", frozen=True), smol, backends=registry)
    assert "`method rome` changes weights, but the spec says `weights frozen`" in str(e.value)
    assert "method memory" in e.value.hint


@pytest.mark.parametrize("method", ["memit", "alphaedit", "ft", "mend"])
def test_every_weight_method_refused_when_frozen(registry, smol, method):
    with pytest.raises(PlanError, match="weights frozen"):
        plan(make_spec(kz(), method=method, frozen=True), smol, backends=registry)


def test_explicit_memory_with_frozen_is_fine(registry, smol):
    p = plan(make_spec(kz(), method="memory", frozen=True), smol, backends=registry)
    assert backends(p) == ["memory"]


@pytest.mark.parametrize("method", ["rome", "memory"])
def test_single_layer_method_refuses_a_layer_range(registry, smol, method):
    with pytest.raises(PlanError, match=f"`method {method}` edits a single layer") as e:
        plan(make_spec(kz(), method=method, layers=(3, 4, 5)), smol, backends=registry)
    assert "memit" in e.value.hint


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_explicit_locate_then_edit_keys_subjectless_edit_on_last_token(registry, smol, method):
    spec = make_spec(prompt_edit("messi", "The 2022 World Cup was won by", "Argentina"),
                     method=method)
    p = plan(spec, smol, backends=registry)
    assert backends(p) == [method]
    assert p.steps[0].edits[0].subject is None
    text = reasons_text(p.steps[0])
    assert "key on the last prompt token" in text
    assert f"name no subject, so {method} keys them on the prompt's last token" in text


def test_explicit_mend_without_editor_says_it_trains_one(registry, smol):
    p = plan(make_spec(kz(), method="mend"), smol, backends=registry)
    assert backends(p) == ["mend"]
    assert "no trained MEND editor is registered for smollm2-135m" in reasons_text(p.steps[0])


def test_explicit_method_must_be_registered(smol):
    with pytest.raises(PlanError) as e:
        plan(make_spec(kz(), method="alphaedit"), smol, backends=fake_registry("rome", "memit"))
    assert "backend 'alphaedit' is not available in this installation" in str(e.value)
    assert "registered: memit, rome" in str(e.value)


def test_policy_choice_must_be_registered(smol):
    with pytest.raises(PlanError, match="backend 'memit' is not available"):
        plan(make_spec(*many(2)), smol, backends=fake_registry("rome"))


def test_empty_registry_says_none(smol):
    with pytest.raises(PlanError, match=r"registered: none"):
        plan(make_spec(kz()), smol, backends={})


# -- 2. weights frozen ------------------------------------------------------------------


def test_frozen_weights_choose_memory(registry, smol):
    p = plan(make_spec(*many(3), frozen=True), smol, backends=registry)
    assert backends(p) == ["memory"]
    assert "the spec says `weights frozen`: only an external memory" in reasons_text(p.steps[0])


def test_frozen_beats_sequence_and_editors(registry, smol):
    p = plan(make_spec(*many(2), frozen=True, order="sequence"), smol, backends=registry,
             editors={smol.fingerprint})
    assert set(backends(p)) == {"memory"}


def test_frozen_with_layer_range_is_refused(registry, smol):
    with pytest.raises(PlanError, match="external memory at one layer"):
        plan(make_spec(kz(), frozen=True, layers=(3, 4)), smol, backends=registry)


# -- 3. order sequence ------------------------------------------------------------------


def test_sequence_chooses_alphaedit_one_step_per_edit_in_order(registry, smol):
    p = plan(make_spec(*many(3), order="sequence"), smol, backends=registry)
    assert [s.id for s in p.steps] == ["s01-alphaedit", "s02-alphaedit", "s03-alphaedit"]
    assert [s.edits[0].name for s in p.steps] == ["e000", "e001", "e002"]
    text = reasons_text(p.steps[1])
    assert "the spec says `order sequence`: AlphaEdit applies edits one at a time" in text
    assert "`order sequence`: 3 steps, one per edit, applied in spec order" in text


def test_sequence_beats_mend_editor(registry, smol):
    p = plan(make_spec(*many(2), order="sequence"), smol, backends=registry,
             editors={smol.fingerprint})
    assert set(backends(p)) == {"alphaedit"}


def test_explicit_batch_method_in_sequence_order_is_one_step_per_edit(registry, smol):
    p = plan(make_spec(*many(3), method="memit", order="sequence"), smol, backends=registry)
    assert [s.id for s in p.steps] == ["s01-memit", "s02-memit", "s03-memit"]


# -- 4. trained MEND editor ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["fingerprint", "name"])
def test_trained_editor_chooses_mend_for_a_single_edit(registry, smol, key):
    p = plan(make_spec(kz()), smol, backends=registry, editors=[getattr(smol, key)])
    assert backends(p) == ["mend"]
    assert "a trained MEND editor exists for smollm2-135m" in reasons_text(p.steps[0])


def test_trained_editor_leaves_batches_to_memit(registry, smol):
    p = plan(make_spec(*many(3)), smol, backends=registry, editors={smol.fingerprint})
    assert backends(p) == ["memit"]


def test_editor_for_another_model_is_ignored(registry, smol):
    p = plan(make_spec(kz()), smol, backends=registry, editors={"fp-gpt2-xl", ""})
    assert backends(p) == ["rome"]


# -- 5. free-form without subject / generality first -> ft -------------------------------


def test_subjectless_free_form_edit_chooses_ft(registry, smol):
    spec = make_spec(kz(), prompt_edit("messi", "The 2022 World Cup was won by", "Argentina"))
    p = plan(spec, smol, backends=registry)
    assert backends(p) == ["ft"]
    assert "free-form edit(s) messi name no subject for a locate-then-edit method" in \
        reasons_text(p.steps[0])


def test_free_form_edit_with_subject_uses_locate_then_edit(registry, smol):
    spec = make_spec(prompt_edit("messi", "The 2022 World Cup was won by", "Argentina",
                                 subject="World Cup"))
    p = plan(spec, smol, backends=registry)
    assert backends(p) == ["rome"]
    assert p.steps[0].edits[0].subject == "World Cup"


def test_generality_first_chooses_ft(registry, smol):
    spec = make_spec(*many(3), claims=(Claim(metric="generality", threshold=0.95),))
    p = plan(spec, smol, backends=registry)
    assert backends(p) == ["ft"]
    assert ("generality first: the spec claims generality >= 0.95 and declares no locality "
            "claim or preserve prompts") in reasons_text(p.steps[0])


@pytest.mark.parametrize("extra", [
    {"claims": (Claim(metric="generality", threshold=0.95),
                Claim(metric="locality", threshold=0.9))},
    {"claims": (Claim(metric="generality", threshold=0.8),)},
])
def test_generality_with_locality_or_low_threshold_is_not_generality_first(registry, smol, extra):
    p = plan(make_spec(*many(3), **extra), smol, backends=registry)
    assert backends(p) == ["memit"]


def test_preserve_prompts_count_as_locality(registry, smol):
    spec = make_spec(kz(preserve=("The capital of France is",)),
                     claims=(Claim(metric="generality", threshold=0.99),))
    assert backends(plan(spec, smol, backends=registry)) == ["rome"]


def test_threshold_constant_is_documented_value():
    assert cb.GENERALITY_FIRST == 0.9 and cb.BATCH_THRESHOLD == 2


# -- 6./7. batch size -----------------------------------------------------------------


def test_single_edit_chooses_rome(registry, smol):
    p = plan(make_spec(kz()), smol, backends=registry)
    assert backends(p) == ["rome"]
    assert [s.id for s in p.steps] == ["s01-rome"]
    assert "a single edit: ROME's rank-one update of one mid-early MLP" in reasons_text(p.steps[0])


def test_two_edits_choose_memit_in_one_step(registry, smol):
    p = plan(make_spec(*many(2)), smol, backends=registry)
    assert [s.id for s in p.steps] == ["s01-memit"]
    assert [e.name for e in p.steps[0].edits] == ["e000", "e001"]
    text = reasons_text(p.steps[0])
    assert "2 edits in one batch (>= 2): MEMIT inserts them with one joint least-squares solve" \
        in text
    assert "all 2 edit(s) in one memit batch step" in text


def test_one_edit_with_layer_range_chooses_memit(registry, smol):
    p = plan(make_spec(kz(), layers=(3, 4, 5)), smol, backends=registry)
    assert backends(p) == ["memit"]
    assert "one edit but 3 layers given" in reasons_text(p.steps[0])


def test_one_edit_with_one_layer_stays_rome(registry, smol):
    p = plan(make_spec(kz(), layers=(7,)), smol, backends=registry)
    assert backends(p) == ["rome"] and p.steps[0].layers == (7,)


def test_plan_level_reasons_record_the_backend_choice(registry, smol):
    p = plan(make_spec(*many(2)), smol, backends=registry)
    assert [r.choice for r in p.reasons] == ["resolve 2 edit(s)", "backend memit"]


def test_no_edits_gives_an_empty_plan_with_a_reason(registry, smol):
    p = plan(make_spec(), smol, backends=registry)
    assert p.steps == ()
    assert "the spec declares no edits, so there is nothing to do" in reasons_text(p)
    assert p.cost.seconds == 0.0


def test_mixed_relations_still_one_backend(registry, smol):
    spec = make_spec(kz(), triple("fr", "France", "French", relation="language"))
    p = plan(spec, smol, backends=registry)
    assert backends(p) == ["memit"]
    assert p.steps[0].edits[1].prompt == "The official language of France is"


def test_memit_chunks_large_batches_without_splitting_pairs(registry, smol):
    import dataclasses

    registry["memit"].info = dataclasses.replace(registry["memit"].info, max_batch=4)
    edits = list(many(7))
    edits[1] = edits[1].model_copy(update={"expect_reversal": True})
    edits[3] = edits[3].model_copy(update={"expect_reversal": True})
    p = plan(make_spec(*edits), smol, backends=registry)
    names = [[e.name for e in s.edits] for s in p.steps]
    assert names == [["e000", "e001", "e001~reverse", "e002"],
                     ["e003", "e003~reverse", "e004", "e005"], ["e006"]]
    assert [s.id for s in p.steps] == ["s01-memit", "s02-memit", "s03-memit"]
    assert "9 edits exceed 4, the largest batch memit was evaluated at in one solve" in \
        reasons_text(p.steps[0])


def test_memit_default_chunk_is_the_papers_largest_batch():
    from kmec.backends import BACKENDS

    assert BACKENDS["memit"].info.max_batch == 10_000


def test_facts_family_drives_defaults(registry):
    p = plan(make_spec(kz()), FACTS["gpt2-xl"], backends=registry)
    assert p.steps[0].params["lr"] == 0.1 and p.model_arch == "GPT2LMHeadModel"
