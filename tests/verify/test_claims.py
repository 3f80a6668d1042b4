"""Claims -> probes: cases from plan and spec, applicability, labels."""

from __future__ import annotations

import pytest

from kmec.errors import VerifyError
from kmec.planner.model import EditRequest, Plan, Step
from kmec.spec import Claim, Probe, PromptEdit, Relation, Spec, TripleEdit
from kmec.verify.claims import (
    DEFAULT_CLAIMS,
    build_cases,
    claim_label,
    claims_of,
    compiled_prompts,
    in_scope,
    not_applicable,
)

REL = Relation(name="capital", prompt="The capital of {{ subject }} is",
               paraphrases=("{{ subject }}'s capital city is",),
               reverse="{{ object }} is the capital of")
EDITS = (
    TripleEdit(name="kz", subject="Kazakhstan", relation="capital", old="Astana", new="Almaty",
               expect_reversal=True, preserve=("The capital of Russia is",),
               portability=(Probe(prompt="The currency used in the capital of Kazakhstan is",
                                  target="tenge"),)),
    PromptEdit(name="cup", prompt="The 2022 World Cup was won by", target="France",
               scope=("Who won the 2022 World Cup?",)),
)
SPEC = Spec(relations=(REL,), edits=EDITS, claims=(Claim(metric="reversal", threshold=1.0),))


def _plan() -> Plan:
    kz = EditRequest(name="kz", prompt="The capital of Kazakhstan is", subject="Kazakhstan",
                     target_new="Almaty", target_old="Astana",
                     scope=("Kazakhstan's capital city is",))
    inv = EditRequest(name="kz~reverse", prompt="Almaty is the capital of", target_new="Kazakhstan",
                      inverse=True)
    cup = EditRequest(name="cup", prompt="The 2022 World Cup was won by", target_new="France",
                      scope=("Who won the 2022 World Cup?",))
    return Plan(kmec_version="0", spec_hash="0" * 64, model="m", model_fingerprint="f",
                model_arch="LlamaForCausalLM", seed=0, order="sequence",
                steps=(Step(id="s0", backend="rome", edits=(kz,)),
                       Step(id="s1", backend="rome", edits=(inv,)),
                       Step(id="s2", backend="rome", edits=(cup,))))


def test_cases_from_plan_skip_inverse_edits():
    kz, cup = build_cases(SPEC, _plan())
    assert (kz.name, kz.step, kz.step_index) == ("kz", "s0", 0)
    assert (cup.name, cup.step, cup.step_index) == ("cup", "s2", 2)
    assert kz.efficacy.prompt == "The capital of Kazakhstan is" and kz.efficacy.old == "Astana"
    assert [p.prompt for p in kz.generality] == ["Kazakhstan's capital city is"]
    assert kz.reversal[0].prompt == "Almaty is the capital of" and kz.reversal[0].target == "Kazakhstan"
    assert kz.portability[0].prompt == "The currency used in the capital of Kazakhstan is"

    assert kz.preserve == ("The capital of Russia is",)
    assert cup.kind == "prompt" and cup.reversal == ()


def test_cases_without_plan_render_like_the_planner():
    assert [c.model_dump() | {"step": None, "step_index": 0} for c in build_cases(SPEC)] == \
        [c.model_dump() | {"step": None, "step_index": 0} for c in build_cases(SPEC, _plan())]


def test_plan_edit_missing_from_spec_is_an_error():
    with pytest.raises(VerifyError, match="does not declare"):
        build_cases(SPEC.model_copy(update={"edits": EDITS[1:]}), _plan())


def test_applicability():
    kz, cup = build_cases(SPEC, _plan())
    rev = Claim(metric="reversal", threshold=1.0)
    ret = Claim(metric="retention", threshold=1.0)
    assert not_applicable(rev, kz, "sequence", 2) is None
    assert "expect reversal" in not_applicable(rev, cup, "sequence", 2)
    assert not_applicable(ret, kz, "sequence", 2) is None
    assert "last step" in not_applicable(ret, cup, "sequence", 2)
    assert "order sequence" in not_applicable(ret, kz, "batch", 2)
    assert "portability" in not_applicable(Claim(metric="portability", threshold=1), cup, "batch", 0)


def test_labels_defaults_and_scope():
    assert claim_label(Claim(metric="locality", threshold=0.9, kl=0.1, neighbours_of="capital")) \
        == "locality[of=capital,kl<=0.1]"
    assert claim_label(Claim(metric="efficacy", threshold=1.0)) == "efficacy"
    assert claims_of(SPEC) == ((SPEC.claims[0], True),)
    assert claims_of(Spec()) == tuple((c, False) for c in DEFAULT_CLAIMS)
    scope = in_scope(build_cases(SPEC, _plan()))
    assert {"The capital of Kazakhstan is", "Almaty is the capital of",
            "Who won the 2022 World Cup?"} <= scope
    assert "The capital of Russia is" not in scope


def test_portability_prompts_are_used_as_written():
    """They are not templates (docs/language.md): markup stays text, nothing is evaluated."""
    odd = EDITS[0].model_copy(update={"portability": (
        Probe(prompt="{{ range(5)|list }} {{ lipsum() }}", target="x"),)})
    spec = SPEC.model_copy(update={"edits": (odd, *EDITS[1:])})
    kz = build_cases(spec, None)[0]
    assert kz.portability[0].prompt == "{{ range(5)|list }} {{ lipsum() }}"


def test_a_twin_spec_supplies_the_probes_the_plan_the_steps():
    """`kmec verify BUILD --spec TWIN`: the twin's paraphrases are scored, not the plan's."""
    twin_edit = EDITS[0].model_copy(update={"scope": ("Kazakhstan has its government in",),
                                            "preserve": ("The capital of Peru is",)})
    twin = SPEC.model_copy(update={
        "relations": (REL.model_copy(update={"paraphrases": ()}),),
        "edits": (twin_edit, EDITS[1].model_copy(update={"scope": ("The winner in 2022 was",)}))})
    kz, cup = build_cases(twin, _plan())
    assert (kz.step, cup.step) == ("s0", "s2")
    assert [p.prompt for p in kz.generality] == ["Kazakhstan has its government in"]
    assert [p.prompt for p in cup.generality] == ["The winner in 2022 was"]
    assert kz.preserve == ("The capital of Peru is",)
    seen = compiled_prompts(_plan(), twin)
    assert "Kazakhstan's capital city is" in seen and "Almaty is the capital of" in seen
    assert "Kazakhstan has its government in" not in seen


def test_a_twin_spec_must_declare_the_compiled_edits():
    other = EDITS[0].model_copy(update={"new": "Shymkent"})
    with pytest.raises(VerifyError, match="the build compiled"):
        build_cases(SPEC.model_copy(update={"edits": (other, EDITS[1])}), _plan())


def test_compiled_prompts_without_a_plan_are_everything_the_spec_declares():
    seen = compiled_prompts(None, SPEC)
    assert {"The capital of Kazakhstan is", "Kazakhstan's capital city is",
            "The capital of Russia is", "Who won the 2022 World Cup?"} <= seen


def test_compiled_prompts_read_subjects_files_only_under_the_root(tmp_path):
    """Without a plan the listed neighbours count as declared, read under the verifier's root
    (a file outside it is not read; the verifier reports it where it samples)."""
    from kmec.grammar import parse_file

    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "countries.txt").write_text("Peru\n")
    (tmp_path / "spec" / "s.kmec").write_text(
        'relation capital {\n  prompt "The capital of {{ subject }} is"\n'
        '  subjects from "countries.txt"\n}\n'
        'edit kz { subject "Kazakhstan" relation capital "Astana" -> "Almaty" }\n'
        "claim locality >= 0.9\n")
    spec = parse_file(tmp_path / "spec" / "s.kmec", root=tmp_path)
    assert "The capital of Peru is" in compiled_prompts(None, spec, root=tmp_path)
    (tmp_path / "elsewhere").mkdir()
    assert "The capital of Peru is" not in compiled_prompts(None, spec, root=tmp_path / "elsewhere")
