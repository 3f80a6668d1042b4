"""compile scores the claims with the verifier and repairs what fails (kmec.pipeline._Loop).

The planner and the executor are replaced by stand-ins whose result depends on the plan
(a payload that makes the edit only once λ was lowered), so the loop's mechanics are
tested on the tiny model with the real verifier: attempts, the plan written, the log,
repairs.json, the up-to-date check, the verdict and the exit codes.
"""

from __future__ import annotations

import json

import pytest
import torch

from kmec.artifacts import build_artifact
from kmec.artifacts.payloads import LowRank
from kmec.grammar import format_spec
from tests.verify.conftest import CLAIMS, PARAM, cli, make_plan, make_spec


@pytest.fixture()
def loop_env(setup, tmp_path, tiny_loader, good, monkeypatch):
    spec = make_spec(setup.old, setup.new, CLAIMS)
    path = tmp_path / "spec.kmec"
    path.write_text(format_spec(spec))
    nothing = LowRank(PARAM, torch.zeros(32, 1), torch.zeros(2048, 1))
    calls: list[float] = []

    def fake_plan(spec, facts, **_):
        p = make_plan(spec, setup.fingerprint)
        step = p.steps[0].model_copy(update={"params": {
            "lambda_rel": 0.5, "locality_weight": 1.0, "fit_weight": {}, "value": {"steps": 4}}})
        return p.model_copy(update={"steps": (step,)})

    gen = torch.Generator().manual_seed(0)
    harmful = LowRank(PARAM, 30 * torch.randn(32, 1, generator=gen),
                      torch.randn(2048, 1, generator=gen))

    def fake_execute(plan, lm, **_):
        params = plan.steps[0].params
        lam = params["lambda_rel"]
        calls.append(lam)
        if env["needs"] == "steps":  # λ < 0.5 harms, only pushing the edit's δ makes it
            payload = (good if params["value"].get("push") else
                       harmful if lam < 0.5 else nothing)
        else:
            payload = good if lam < env["needs"] else nothing
        return build_artifact([(plan.steps[0].id, [payload])], base_model="tiny",
                              base_fingerprint=setup.fingerprint, base_arch="LlamaForCausalLM",
                              weight_layout="out_in", plan_hash=plan.sha256)

    from kmec.models.load import ModelRef

    monkeypatch.setattr("kmec.pipeline.resolve_ref", lambda ref: ModelRef(ref, "folder", None))
    monkeypatch.setattr("kmec.planner.plan", fake_plan)
    monkeypatch.setattr("kmec.compile.execute", fake_execute)
    env = {"spec": path, "calls": calls, "needs": 0.5, "out": tmp_path / "build"}
    return env


def test_a_failing_claim_is_repaired_and_every_attempt_recorded(loop_env):
    from kmec.pipeline import compile_spec

    r = compile_spec(loop_env["spec"], out=loop_env["out"], budget=600)
    assert r.claims_ok is True and not r.up_to_date
    assert [a.rung for a in r.attempts] == ["planned", "realise"]
    assert r.attempts[0].failed and r.attempts[0].misses[0].metric == "efficacy"
    assert not r.attempts[1].failed
    out = loop_env["out"]
    executed = json.loads((out / "plan.json").read_text())
    assert executed["steps"][0]["params"]["lambda_rel"] == 0.1
    assert any(x["choice"] == "repair 1: λ 0.5 -> 0.1 (realise)"
               for x in executed["steps"][0]["reasons"])
    info = json.loads((out / "build.json").read_text())
    assert info["plan_hash"] == r.plan.sha256 != info["planned_hash"]
    assert info["claims_ok"] is True
    repairs = json.loads((out / "repairs.json").read_text())
    assert [a["rung"] for a in repairs] == ["planned", "realise"]
    log = (out / "compile.log").read_text()
    assert "attempt 1 (planned" in log and "attempt 2 (realise" in log and "fails: efficacy" in log
    # the same spec again: up to date by the planner's plan, nothing runs
    calls = len(loop_env["calls"])
    again = compile_spec(loop_env["spec"], out=out, budget=600)
    assert again.up_to_date and again.claims_ok is True and len(loop_env["calls"]) == calls
    assert again.plan.sha256 == r.plan.sha256
    # and kmec verify agrees with the loop
    assert cli("verify", str(out), "--max-examples", "20") == 0


def test_plan_explain_shows_the_repairs_of_a_build(loop_env, capsys):
    from kmec.pipeline import compile_spec

    compile_spec(loop_env["spec"], out=loop_env["out"], budget=600)
    capsys.readouterr()
    assert cli("plan", "--explain", str(loop_env["out"])) == 0
    assert "repair 1: λ 0.5 -> 0.1 (realise)" in capsys.readouterr().out
    assert cli("plan", str(loop_env["out"].parent)) == 2  # a folder without plan.json


def test_claims_out_of_reach_exit_1_with_the_best_build_and_a_verdict(loop_env, capsys):
    loop_env["needs"] = 0.0  # no rung makes the edit
    code = cli("compile", str(loop_env["spec"]), "-o", str(loop_env["out"]), "--budget", "600")
    assert code == 1
    err = capsys.readouterr().err
    assert "claims FAIL" in err and "out of reach: efficacy" in err
    info = json.loads((loop_env["out"] / "build.json").read_text())
    assert info["claims_ok"] is False and "out of reach" in info["verdict"]
    rungs = [a["rung"] for a in json.loads((loop_env["out"] / "repairs.json").read_text())]
    assert rungs[0] == "planned" and "realise" in rungs and len(rungs) == len(set(rungs))


def test_budget_zero_compiles_without_scoring(loop_env):
    from kmec.pipeline import compile_spec

    r = compile_spec(loop_env["spec"], out=loop_env["out"], budget=0)
    assert r.claims_ok is None and loop_env["calls"] == [0.5]
    assert not (loop_env["out"] / "repairs.json").exists()
    # the same spec with scoring on is not up to date: its claims were never scored
    again = compile_spec(loop_env["spec"], out=loop_env["out"], budget=600)
    assert not again.up_to_date and again.claims_ok is True
    assert compile_spec(loop_env["spec"], out=loop_env["out"], budget=0).up_to_date


def test_a_small_budget_stops_the_ladder_and_says_so(loop_env):
    from kmec.pipeline import compile_spec

    loop_env["needs"] = 0.0
    r = compile_spec(loop_env["spec"], out=loop_env["out"], budget=0.01)
    assert r.claims_ok is False and len(r.attempts) == 1
    assert "budget" in r.verdict and "--budget" in r.verdict
    assert "not met: efficacy" in r.verdict and "out of reach" not in r.verdict


def test_move_takes_the_failing_edits_out_of_their_step_into_a_retrieval_step(setup):
    """The last rung (`method auto` only): the edits that still fail leave their step (with
    their inverse edits) for a retrieval step planned by the planner, its reasons saying why."""
    from pathlib import Path

    from kmec.backends import BACKENDS
    from kmec.models.load import LoadedModel, ModelRef
    from kmec.pipeline import Start, _Loop
    from kmec.planner import plan as make_plan
    from kmec.spec import TripleEdit

    spec = make_spec(setup.old, setup.new, CLAIMS)
    second = TripleEdit(name="spain", subject="Spain", relation="capital", old="Madrid",
                        new="Seville", expect_reversal=True)
    spec = spec.model_copy(update={"edits": (*spec.edits, second)})
    lm = LoadedModel(model=setup.model, tok=setup.tok, facts=setup.facts,
                     ref=ModelRef("tiny", "folder", None))
    planned = make_plan(spec, setup.facts, backends=BACKENDS)
    loop = _Loop(Start(spec, "tiny", lm, ()), planned, None, True, None, Path("."), 0.0, 600)
    moved = loop._move(planned, ["spain"], 3)
    assert moved is not None
    names = [[e.name for e in s.edits] for s in moved.steps]
    assert names[-1] == ["spain", "spain~reverse"] and moved.steps[-1].backend == "retrieval"
    assert all("spain" not in n for n in names[:-1]) and ["france"] in names
    assert moved.steps[-1].id.endswith("-repair-retrieval")
    assert any(r.choice == "repair 3: move spain" for r in moved.steps[-1].reasons)


def test_a_rung_that_made_things_worse_is_not_built_upon(loop_env):
    """Each rung changes the best attempt so far; a rung that would rerun a plan already
    tried (here `realise-again` after an undone `realise`) is skipped and logged."""
    from kmec.pipeline import compile_spec

    loop_env["needs"] = "steps"
    r = compile_spec(loop_env["spec"], out=loop_env["out"], budget=600)
    rungs = [a.rung for a in r.attempts]
    assert r.claims_ok is True and rungs[:3] == ["planned", "realise", "weigh"]
    assert rungs[-1] == "optimise" and "realise-again" not in rungs and "weigh-again" not in rungs
    assert len(r.attempts[1].failed) > len(r.attempts[0].failed)  # realise harmed
    assert r.plan.steps[0].params["lambda_rel"] == 0.5  # its λ was not carried on
    assert len({a.plan_hash for a in r.attempts}) == len(r.attempts)
    log = (loop_env["out"] / "compile.log").read_text()
    assert "repair realise-again skipped: it gives the plan of attempt 2" in log
