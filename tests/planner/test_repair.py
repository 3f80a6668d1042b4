"""The repair ladder (kmec.planner.repair): pure, deterministic, targeted at the misses,
recorded in the plan, respectful of `method X`."""

from __future__ import annotations

from kmec.backends import BACKENDS
from kmec.planner import plan
from kmec.planner.draft import example_facts
from kmec.planner.repair import RUNGS, Miss, next_repair
from kmec.spec import Claim, MethodHint, Relation
from tests.planner.helpers import make_spec, triple


def _spec(method: str = "auto"):
    capital = Relation(name="capital", prompt="The capital of {{ subject }} is",
                       paraphrases=("{{ subject }}'s capital city is",),
                       subjects=("Peru", "Chile"))
    spec = make_spec(triple("fr", "France", "Lyon"), triple("de", "Germany", "Munich"),
                     method=method, claims=(Claim(metric="generality", threshold=0.6),
                                            Claim(metric="locality", threshold=0.9,
                                                  neighbours_of="capital")))
    return spec.model_copy(update={"relations": (capital,)})


def _plan(spec):
    return plan(spec, example_facts(), backends=BACKENDS)


GEN = Miss(metric="generality", claim="generality", edit="fr", score=0.5, threshold=0.6)
EFF = Miss(metric="efficacy", claim="efficacy", edit="de", score=0.8, threshold=0.9)
LOC = Miss(metric="locality", claim="locality[of=capital,kl<=0.1]", edit="de", score=0.85,
           threshold=0.9)


def test_the_first_rung_for_a_generality_miss_lowers_lambda_and_says_why():
    p0 = _plan(_spec())
    r = next_repair(p0, [GEN], (), spec=_spec())
    assert r is not None and r.rung == "realise" and not r.costly
    step = r.plan.steps[0]
    assert step.params["lambda_rel"] == p0.steps[0].params["lambda_rel"] / 5
    assert step.reasons[-1].choice.startswith("repair 1: λ")
    assert "generality on fr (0.50 < 0.6)" in step.reasons[-1].because
    assert r.plan.sha256 != p0.sha256  # the executed plan differs and is hashed


def test_the_ladder_is_deterministic_and_climbs_in_order():
    spec = _spec()
    p, climbed, seen = _plan(spec), [], []
    for _ in range(len(RUNGS)):
        r = next_repair(p, [GEN, EFF, LOC], climbed, spec=spec)
        r2 = next_repair(p, [GEN, EFF, LOC], climbed, spec=spec)
        assert r is not None and r2 is not None and r.plan.to_json() == r2.plan.to_json()
        climbed.append(r.rung)
        seen.append(r.rung)
        p = r.plan
    assert seen == [name for name, _ in RUNGS]
    params = p.steps[0].params
    assert params["fit_weight"] == {"de": 16.0, "fr": 16.0}  # weigh twice, the failing edits
    assert params["value"]["scope_boost"] == {"fr": 4.0}  # broaden: the generality miss only
    assert params["locality_weight"] == 4.0
    # optimise: the efficacy miss's edit pushed, the step's steps unchanged
    assert set(params["value"]["push"]) >= {"de"} and set(params["value"]["push"]) <= {
        e.name for e in p.steps[0].edits if e.name.split("~")[0] == "de"}
    assert params["value"]["steps"] == BACKENDS["memit"].default_params(
        example_facts()).value.steps


def test_a_locality_miss_does_not_lower_lambda():
    spec = _spec()
    r = next_repair(_plan(spec), [LOC], (), spec=spec)
    assert r is not None and r.rung == "protect"
    assert r.plan.steps[0].params["locality_weight"] == 4.0


def test_move_is_offered_only_under_method_auto():
    spec = _spec()
    p = _plan(spec)
    everything = [name for name, _ in RUNGS]
    asked = []

    def move(plan_, edits, n):
        asked.append(edits)
        return plan_.model_copy(update={"steps": plan_.steps[:1]})

    r = next_repair(p, [GEN], everything, spec=spec, move=move)
    assert r is not None and r.rung == "move" and r.costly and asked == [("fr",)]
    fixed = _spec("memit")
    assert next_repair(_plan(fixed), [GEN], everything, spec=fixed, move=move) is None
    assert next_repair(p, [GEN], [*everything, "move"], spec=spec, move=move) is None


def test_nothing_to_repair_without_misses_or_with_skipped_rungs():
    spec = _spec()
    p = _plan(spec)
    assert next_repair(p, [], (), spec=spec) is None
    r = next_repair(p, [GEN], (), spec=spec, skip=("realise",))
    assert r is not None and r.rung == "weigh"


def test_a_capability_miss_asks_for_protection():
    spec = _spec()
    cap = Miss(metric="capability", claim="capability canaries", edit="", score=0.8,
               threshold=0.9)
    r = next_repair(_plan(spec), [cap], (), spec=spec)
    assert r is not None and r.rung == "protect"
    assert cap.describe() == "capability canaries (0.80 < 0.9)"


def test_method_hint_is_left_alone_by_parameter_rungs():
    spec = _spec("memit").model_copy(update={"method": MethodHint(method="memit")})
    r = next_repair(_plan(spec), [GEN], (), spec=spec)
    assert r is not None and r.plan.steps[0].backend == "memit"


def test_a_generality_miss_broadens_the_scope_and_does_not_optimise_longer():
    """After the cheap rungs, a generality miss weighs the failing edit's scope prompts
    (costly: its target values change); more δ steps answer efficacy misses only."""
    spec = _spec()
    p = _plan(spec)
    cheap = ["realise", "weigh", "protect", "weigh-again", "realise-again"]
    r = next_repair(p, [GEN], cheap, spec=spec)
    assert r is not None and r.rung == "broaden" and r.costly
    value = r.plan.steps[0].params["value"]
    assert value["scope_boost"] == {"fr": 4.0}
    assert value["steps"] == p.steps[0].params["value"]["steps"]
    assert "scope weight × fr 4 (broaden)" in r.plan.steps[0].reasons[-1].choice
    again = next_repair(r.plan, [GEN], [*cheap, "skip-me"], spec=spec)  # once more: 16
    assert again is not None and again.plan.steps[0].params["value"]["scope_boost"] == {"fr": 16.0}
    assert next_repair(p, [GEN], [*cheap, "broaden"], spec=spec) is None  # no optimise
    r = next_repair(p, [EFF], [*cheap], spec=spec)
    assert r is not None and r.rung == "optimise"


def test_optimise_pushes_only_the_failing_edits():
    """The optimise rung gives the edits whose own prompt fails a stricter stop in up to
    twice the steps (value.push); the step's other edits and its steps are unchanged, so
    only the chunks holding the pushed edits are re-optimised."""
    spec = _spec()
    p = _plan(spec)
    cheap = ["realise", "weigh", "protect", "weigh-again", "realise-again", "broaden"]
    r = next_repair(p, [EFF], cheap, spec=spec)
    assert r is not None and r.rung == "optimise" and r.costly
    before, value = p.steps[0].params["value"], r.plan.steps[0].params["value"]
    assert value["push"] == {e.name: 0.97 for e in p.steps[0].edits
                             if e.name.split("~")[0] == "de"}
    assert set(value["push"]) and all(n.split("~")[0] == "de" for n in value["push"])
    assert {k: v for k, v in value.items() if k != "push"} == before
    assert "pushed to 0.97: de" in r.plan.steps[0].reasons[-1].choice


def test_broaden_leaves_edits_without_scope_prompts_alone():
    spec = _spec()
    p = _plan(spec)
    bare = tuple(s.model_copy(update={"edits": tuple(e.model_copy(update={"scope": ()})
                                                     for e in s.edits)}) for s in p.steps)
    p = p.model_copy(update={"steps": bare})
    cheap = ["realise", "weigh", "protect", "weigh-again", "realise-again"]
    assert next_repair(p, [GEN], cheap, spec=spec) is None
