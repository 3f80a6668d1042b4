"""End-to-end verify on a tiny model with hand-made artifacts (fast tier)."""

from __future__ import annotations

import json

import pytest
import torch

from kmec.artifacts.payloads import LowRank
from kmec.planner.model import EditRequest, Plan, Step
from kmec.spec import Claim, TripleEdit
from kmec.verify import canaries, verify
from kmec.verify.render import to_json
from tests.verify.conftest import (
    PARAM,
    PROMPT,
    artifact_of,
    checked_prompts,
    edited_copy,
    make_plan,
    make_spec,
    run_verify,
    targeted,
)

CLAIMS = (Claim(metric="efficacy", threshold=1.0),
          Claim(metric="locality", threshold=0.9, sample=40, kl=0.01))


def run(setup, payloads, claims=CLAIMS, *, edited=None, **kw):
    return run_verify(setup, payloads, claims, edited=edited, **kw)


@pytest.fixture(scope="module")
def good(setup) -> LowRank:
    spec = make_spec(setup.old, setup.new, CLAIMS)
    avoid = checked_prompts(spec, make_plan(spec, setup.fingerprint))
    return targeted(setup.model, setup.tok, avoid, setup.new, setup.old)


def broad(setup) -> LowRank:
    g = torch.Generator().manual_seed(1)
    u = torch.randn(32, 1, generator=g) * 3
    v = torch.randn(2048, 1, generator=g) * 3
    return LowRank(PARAM, u, v)


def test_targeted_edit_passes(setup, good):
    report = run(setup, [good])
    assert report.ok and report.exit_code == 0, report.summary
    eff = next(c for c in report.claims if c.metric == "efficacy")
    assert eff.score == 1.0 and eff.protocol == "prob" and eff.magnitude > 0
    row = report.edits[0]
    assert row.edited.p_target > row.base.p_target and row.edited.p_old < row.base.p_old
    assert row.edited.top[0].token == setup.new and row.starts_with_new
    loc = next(c for c in report.claims if c.metric == "locality")
    assert loc.n >= 15 and loc.score == 1.0 and loc.counterexample is None
    assert {p.kind for p in loc.probes} >= {"preserve", "neighbour", "corpus"}
    assert report.audit.ran and report.audit.ok and report.capability.ok


def test_edit_that_did_not_take_fails_efficacy(setup):
    nothing = LowRank(PARAM, torch.zeros(32, 1), torch.zeros(2048, 1))
    report = run(setup, [nothing])
    assert report.exit_code == 1
    assert [c.metric for c in report.failures()] == ["efficacy"]
    assert "efficacy on edit 'france'" in report.summary
    assert report.audit.ok


def test_over_broad_edit_fails_locality_with_minimal_counterexample(setup):
    report = run(setup, [broad(setup)])
    assert report.exit_code == 1
    loc = next(c for c in report.claims if c.metric == "locality")
    assert loc.status == "fail" and "locality[kl<=0.01] on edit 'france'" in report.summary
    cx = loc.counterexample
    assert cx is not None
    # everything moves, so the shrinker reaches the simplest prompt of the space:
    # the first strategy (neighbours), first template, first subject
    assert (cx.source, cx.prompt) == ("neighbour", "The capital of Spain is ")
    assert any(p.prompt == cx.prompt and not p.ok for p in loc.probes)


def test_undeclared_weight_fails_audit(setup, good):
    spec = make_spec(setup.old, setup.new, CLAIMS)
    plan = make_plan(spec, setup.fingerprint)
    edited = edited_copy(setup.model, artifact_of([good], setup.fingerprint, plan), setup.fingerprint)
    with torch.no_grad():
        edited.get_parameter("model.layers.0.mlp.up_proj.weight")[0, 0] += 1e-3
    report = run(setup, [good], edited=edited)
    assert report.exit_code == 1 and not report.audit.ok
    assert report.audit.undeclared == ("model.layers.0.mlp.up_proj.weight",)
    assert "audit: audit failed: undeclared parameters moved: model.layers.0.mlp.up_proj.weight" \
        in report.summary


def _without_timing(text: str) -> dict:
    d = json.loads(text)
    d.pop("timing")
    return d


def test_same_run_twice_gives_identical_json(setup, tmp_path):
    a = to_json(run(setup, [broad(setup)]))
    b = to_json(run(setup, [broad(setup)]))
    assert _without_timing(a) == _without_timing(b)
    assert a.splitlines()[:5] == b.splitlines()[:5]
    # with an example database, the second run replays the first's counterexample
    # and still writes the same report
    c = to_json(run(setup, [broad(setup)], db_dir=tmp_path / "db"))
    d = run(setup, [broad(setup)], db_dir=tmp_path / "db")
    assert d.timing["replayed_examples"] >= 1
    assert _without_timing(c) == _without_timing(to_json(d)) == _without_timing(a)


def test_failing_locality_example_is_stored_and_replayed(setup, tmp_path):
    victim = "The capital of Chile is "
    claims = (Claim(metric="efficacy", threshold=1.0),
              Claim(metric="locality", threshold=1.0, sample=60))
    spec = make_spec(setup.old, setup.new, claims)
    avoid = [p for p in checked_prompts(spec, make_plan(spec, setup.fingerprint)) if p != victim]
    edit = targeted(setup.model, setup.tok, avoid, setup.new, setup.old, victim=victim)
    db = tmp_path / "build" / ".hypothesis"
    first = run(setup, [edit], claims, db_dir=db)
    loc = next(c for c in first.claims if c.metric == "locality")
    assert loc.status == "fail" and loc.counterexample.prompt == victim
    assert any(p.is_file() for p in db.rglob("*"))
    # one example is not enough to find the victim by generation ...
    fresh = run(setup, [edit], claims, max_examples=1, db_dir=tmp_path / "fresh")
    assert fresh.ok, fresh.summary
    # ... but the stored failure is replayed first
    again = run(setup, [edit], claims, max_examples=1, db_dir=db)
    loc = next(c for c in again.claims if c.metric == "locality")
    assert again.timing["replayed_examples"] >= 1
    assert loc.status == "fail" and loc.counterexample.prompt == victim


def test_protocols_and_applicability(setup, good):
    claims = (Claim(metric="efficacy", threshold=1.0, protocol="token"),
              Claim(metric="efficacy", threshold=1.0, protocol="greedy"),
              Claim(metric="generality", threshold=0.0),
              Claim(metric="reversal", threshold=1.0),
              Claim(metric="retention", threshold=1.0))
    report = run(setup, [good], claims)
    by = {c.claim: c for c in report.claims}
    assert by["efficacy[token]"].protocol == "token" and by["efficacy[token]"].score == 1.0
    assert by["efficacy[greedy]"].protocol == "greedy" and by["efficacy[greedy]"].score == 1.0
    assert by["generality"].status == "pass" and by["generality"].n == 1
    assert by["reversal"].status == "n/a" and "expect reversal" in by["reversal"].note
    assert by["retention"].status == "n/a" and "order sequence" in by["retention"].note
    assert not report.capability.ran  # no locality claim
    assert report.ok


def test_sequence_retention_is_scored_after_all_edits(setup, good):
    spec = make_spec(setup.old, setup.new, (Claim(metric="retention", threshold=1.0),))
    second = TripleEdit(name="peru", subject="Peru", relation="capital", new="Q")
    spec = spec.model_copy(update={"order": "sequence", "edits": spec.edits + (second,)})
    e = spec.edits[0]
    steps = (Step(id="s00", backend="rome", edits=(EditRequest(
                 name="france", prompt=PROMPT, subject="France", target_new=e.new,
                 target_old=e.old),)),
             Step(id="s01", backend="rome", edits=(EditRequest(
                 name="peru", prompt="The capital of Peru is ", subject="Peru",
                 target_new="Q"),)))
    plan = Plan(kmec_version="0.1.0", spec_hash="0" * 64, model="tiny",
                model_fingerprint=setup.fingerprint, model_arch="LlamaForCausalLM", seed=0,
                order="sequence", steps=steps)
    from kmec.artifacts import build_artifact
    noise = LowRank(PARAM, torch.zeros(32, 1), torch.zeros(2048, 1))
    art = build_artifact([("s00", [good]), ("s01", [noise])], base_model="tiny",
                         base_fingerprint=setup.fingerprint, base_arch="LlamaForCausalLM",
                         weight_layout="out_in", plan_hash=plan.sha256)
    edited = edited_copy(setup.model, art, setup.fingerprint)
    report = verify(spec, plan, setup.model, edited, setup.tok, seed=0, artifact=art)
    by = {(c.claim, c.edit): c for c in report.claims}
    assert by[("retention", "france")].status == "pass"
    assert "after all edits" in by[("retention", "france")].note
    assert by[("retention", "peru")].status == "n/a"
    assert report.aggregate.retention == 1.0 and report.aggregate.relative_retention == 1.0
    assert any("after all edits" in n for n in report.notes)


def test_a_general_question_an_edit_declares_in_scope_is_not_a_canary():
    """The README demo moves "The capital of Japan is", which is also a general-question
    canary: that question is meant to change, so capability does not count it."""
    from kmec.verify.claims import Case, Check
    from kmec.verify.runner import general_questions

    case = Case(name="japan", kind="triple", subject="Japan", relation="capital",
                efficacy=Check(prompt="The capital of Japan is", target="Osaka", old="Tokyo"))
    kept = general_questions((case,))
    assert "The capital of Japan is" not in kept
    assert len(kept) == len(canaries.GENERAL_QUESTIONS) - 1


def test_a_general_question_the_base_model_cannot_decide_is_not_counted():
    """A base answer that is a near tie (second answer >= 0.9 of the first) is not
    knowledge to keep: the question is reported but not counted."""
    from kmec.verify.evaluate import NEAR_TIE, decided
    from kmec.verify.scoring import ItemScore

    def score(p1, p2):
        return ItemScore((), (), (), (1, 2), (p1, p2))

    assert decided(score(0.70, 0.05)) and decided(score(0.2, NEAR_TIE * 0.2 - 1e-6))
    assert not decided(score(0.118, 0.114))


def test_a_shared_memo_gives_the_reports_a_fresh_verification_gives(setup, good):
    """compile's repair loop verifies several edited models against one base with a
    VerifyMemo: the base side is reused, the reports are those of fresh verifications."""
    from kmec.verify.runner import VerifyMemo

    nothing = LowRank(PARAM, torch.zeros(32, 1), torch.zeros(2048, 1))
    memo = VerifyMemo()
    for payloads in ([nothing], [good], [nothing]):
        fresh = run_verify(setup, payloads, CLAIMS, max_examples=20)
        shared = run_verify(setup, payloads, CLAIMS, max_examples=20, memo=memo)
        a, b = (json.loads(to_json(r)) for r in (fresh, shared))
        for r in (a, b):
            r.pop("timing")
        assert a == b
    assert memo.base.scores and memo.draws and memo.base_ppl is not None


def test_drawn_neighbourhoods_on_disk_give_the_same_report_without_drawing_again(
        setup, good, tmp_path, monkeypatch):
    """A DrawStore keeps what compile drew for `kmec verify` in another process: a fresh
    store on the same folder serves every draw (hypothesis is not run), and the report is
    the one a verification without a store gives."""
    from kmec.verify import runner, variants
    from kmec.verify.drawstore import DrawStore
    from kmec.verify.runner import VerifyMemo

    claims = (*CLAIMS, Claim(metric="generality", threshold=0.0, heldout=True))
    fresh = run_verify(setup, [good], claims, max_examples=20)
    first = run_verify(setup, [good], claims, max_examples=20,
                       memo=VerifyMemo(draws=DrawStore(tmp_path / "draws")))
    files = sorted((tmp_path / "draws").glob("*.json"))
    assert files

    def no_draw(*_a, **_k):
        raise AssertionError("drew again although the store had the draws")

    monkeypatch.setattr(runner, "sample", no_draw)
    monkeypatch.setattr(variants, "draw_from", no_draw)
    again = run_verify(setup, [good], claims, max_examples=20,
                       memo=VerifyMemo(draws=DrawStore(tmp_path / "draws")))
    a, b, c = (json.loads(to_json(r)) for r in (fresh, first, again))
    for r in (a, b, c):
        r.pop("timing")
    assert a == b == c


def test_a_damaged_draw_file_is_a_miss_not_an_error(tmp_path):
    from kmec.verify.drawstore import DrawStore
    from kmec.verify.strategies import Draw

    store = DrawStore(tmp_path / "d")
    store["k"] = [Draw("neighbour", "The capital of Spain is")]
    assert DrawStore(tmp_path / "d")["k"] == [Draw("neighbour", "The capital of Spain is")]
    (path,) = (tmp_path / "d").glob("*.json")
    for text in ("{", '{"format": "kmec-draws/1", "key": "other", "draws": []}',
                 '{"format": "kmec-draws/1", "key": "k", "draws": [["a"]]}'):
        path.write_text(text)
        assert "k" not in DrawStore(tmp_path / "d")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    store = DrawStore(blocked / "d")  # cannot be created: kept in memory, a warning
    store["k"] = []
    assert store["k"] == []
