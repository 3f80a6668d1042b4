"""Declared vs held out: drawn variants, held-out claims, the split in every result."""

from __future__ import annotations

import pytest

from kmec.spec import Claim
from kmec.verify import verify
from kmec.verify.claims import Check, compiled_prompts
from kmec.verify.render import to_json
from kmec.verify.variants import FRAMINGS, heldout_checks
from tests.verify.conftest import (
    PROMPT,
    SUBJECTS,
    artifact_of,
    checked_prompts,
    edited_copy,
    make_plan,
    make_spec,
    targeted,
)

CHECKS = (Check(prompt="The capital of France is", target=" Lyon", old=" Paris"),
          Check(prompt="France's capital city is", target=" Lyon", old=" Paris"))


def test_variants_keep_the_question_and_leave_out_compiled_prompts():
    exclude = frozenset({"Fact: The capital of France is"})
    drawn = heldout_checks("france", "generality", CHECKS, 12, seed=0, draw="verify",
                           exclude=exclude)
    assert 6 <= len(drawn) <= 12
    assert {src for src, _ in drawn} == {"framing", "context"}
    for src, c in drawn:
        base = next(b for b in CHECKS if c.prompt.endswith(" " + b.prompt))
        assert (c.target, c.old) == (base.target, base.old)
        assert c.prompt not in exclude and c.prompt != base.prompt
        if src == "framing":
            assert any(c.prompt == f + base.prompt for f in FRAMINGS)
        else:
            assert c.prompt.endswith(". " + base.prompt)
    again = heldout_checks("france", "generality", CHECKS, 12, seed=0, draw="verify",
                           exclude=exclude)
    assert again == drawn  # seeded: CI sees the same variants every run


def test_compile_and_verify_draw_other_variants():
    """What compile's repair loop selected on is not what kmec verify scores."""
    ver = {c.prompt for _, c in heldout_checks("france", "generality", CHECKS, 8, seed=0,
                                                draw="verify", exclude=frozenset())}
    com = {c.prompt for _, c in heldout_checks("france", "generality", CHECKS, 8, seed=0,
                                                draw="compile", exclude=frozenset())}
    assert ver != com
    assert heldout_checks("france", "reversal", (), 8, seed=0, draw="verify",
                          exclude=frozenset()) == ()


CLAIMS = (Claim(metric="efficacy", threshold=1.0),
          Claim(metric="generality", threshold=0.0),
          Claim(metric="generality", threshold=0.0, heldout=True, sample=5),
          Claim(metric="locality", threshold=0.0, sample=30, kl=0.01),
          Claim(metric="locality", threshold=0.0, sample=30, kl=0.01, heldout=True))


@pytest.fixture(scope="module")
def protected(setup):
    """A spec with the claims above and a plan whose step protects every neighbour
    prompt of the relation (as the planner's declare_locality pass would)."""
    spec = make_spec(setup.old, setup.new, CLAIMS)
    plan = make_plan(spec, setup.fingerprint)
    protect = tuple(f"{t.format(s)}" for s in SUBJECTS
                    for t in ("The capital of {} is ", "{}'s capital is "))
    step = plan.steps[0].model_copy(update={"protect": protect})
    plan = plan.model_copy(update={"steps": (step,)})
    avoid = checked_prompts(spec, plan)
    edit = targeted(setup.model, setup.tok, avoid, setup.new, setup.old)
    art = artifact_of([edit], setup.fingerprint, plan)
    edited = edited_copy(setup.model, art, setup.fingerprint)
    return spec, plan, edited, art


def test_every_result_reports_declared_and_held_out(setup, protected):
    spec, plan, edited, art = protected
    report = verify(spec, plan, setup.model, edited, setup.tok, seed=0, artifact=art)
    seen = compiled_prompts(plan, spec)
    by = {c.claim: c for c in report.claims}

    gen = by["generality"]  # the declared paraphrase decides; variants are reported
    assert [p.prompt for p in gen.probes] == ["France's capital is "]
    assert not gen.probes[0].heldout and gen.declared_n == 1 and gen.declared_score == gen.score
    assert gen.heldout_n == len(gen.heldout_probes) >= 4
    assert all(p.heldout and p.prompt not in seen for p in gen.heldout_probes)
    assert {p.kind for p in gen.heldout_probes} <= {"framing", "context"}

    held = by["generality[heldout]"]  # the variants decide
    assert held.heldout and held.n == len(held.probes) <= 5 and held.heldout_probes == ()
    assert all(p.heldout and p.prompt not in seen for p in held.probes)
    assert held.declared_n == 1 and held.heldout_score == held.score  # the declared side: beside it

    loc = by["locality[kl<=0.01]"]
    assert loc.declared_n + loc.heldout_n == loc.n
    assert loc.declared_n > 0  # neighbours of the relation are protected: declared
    assert all((p.prompt in seen) != p.heldout for p in loc.probes)

    hloc = by["locality[kl<=0.01,heldout]"]
    assert hloc.n > 0 and hloc.declared_n == 0
    assert all(p.heldout and p.prompt not in seen for p in hloc.probes)
    assert "neighbour" not in {p.kind for p in hloc.probes}  # every bare neighbour is protected

    again = verify(spec, plan, setup.model, edited, setup.tok, seed=0, artifact=art)
    assert to_json(again.model_copy(update={"timing": {}})) \
        == to_json(report.model_copy(update={"timing": {}}))


def test_a_twin_spec_is_scored_on_its_own_prompts_as_held_out(setup, protected):
    spec, plan, edited, art = protected
    edit = spec.edits[0].model_copy(update={"scope": ("Of France the capital is ",)})
    rel = spec.relations[0].model_copy(update={"paraphrases": ()})
    twin = spec.model_copy(update={"edits": (edit,), "relations": (rel, spec.relations[1]),
                                   "claims": (Claim(metric="generality", threshold=0.0),)})
    report = verify(twin, plan, setup.model, edited, setup.tok, seed=0, artifact=art)
    gen = report.claims[0]
    assert [(p.prompt, p.heldout) for p in gen.probes] == [("Of France the capital is ", True)]
    assert gen.declared_n == 0 and gen.heldout_n == 1 + len(gen.heldout_probes)
    assert PROMPT in compiled_prompts(plan, twin)


def test_compile_loop_scores_variants_only_for_heldout_claims(setup, protected):
    """report_heldout=False (compile's loop): the same verdicts; variants are drawn only for
    the families a heldout claim decides."""
    spec, plan, edited, art = protected
    for claims in (spec.claims, tuple(c for c in spec.claims if not c.heldout)):
        s = spec.model_copy(update={"claims": claims})
        full = verify(s, plan, setup.model, edited, setup.tok, seed=0, artifact=art)
        lean = verify(s, plan, setup.model, edited, setup.tok, seed=0, artifact=art,
                      report_heldout=False)
        by_full = {c.claim: c for c in full.claims}
        by_lean = {c.claim: c for c in lean.claims}
        assert {k: (c.status, c.score) for k, c in by_full.items()} == \
            {k: (c.status, c.score) for k, c in by_lean.items()}
    assert by_full["generality"].heldout_probes and by_lean["generality"].heldout_probes == ()
