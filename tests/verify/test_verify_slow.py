"""Verify on the embedded SmolLM2-135M (slow tier)."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from kmec.artifacts import apply, build_artifact
from kmec.artifacts.payloads import LowRank
from kmec.models.hooks import Trace
from kmec.planner.model import EditRequest, Plan, Step
from kmec.spec import Claim, Relation, Spec, TripleEdit
from kmec.verify import verify
from kmec.verify.scoring import Item, encode_item, score_items

pytestmark = pytest.mark.slow

CAPITALS = [("France", "Paris", "Lyon"), ("Germany", "Berlin", "Munich"), ("Italy", "Rome", "Milan"),
            ("Spain", "Madrid", "Barcelona"), ("Japan", "Tokyo", "Osaka"),
            ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"),
            ("Turkey", "Ankara", "Istanbul"), ("India", "New Delhi", "Mumbai"),
            ("Egypt", "Cairo", "Alexandria")]
NEIGHBOURS = ("Portugal", "Poland", "Greece", "Sweden", "Norway", "Austria", "Belgium", "Ireland",
              "Finland", "Denmark", "Hungary", "Peru", "Chile", "Argentina", "Mexico", "Cuba")
TEMPLATES = ("The capital of {{ subject }} is", "{{ subject }}'s capital city is")


def test_targets_are_scored_with_the_leading_space(real_model):
    tok = real_model.tok
    enc = encode_item(tok, Item("The capital of France is", "Paris"))
    assert enc.target_ids == tuple(tok(" Paris", add_special_tokens=False)["input_ids"])
    ((s,),) = score_items([real_model.model], tok, [Item("The capital of France is", "Paris")])
    assert tok.decode([s.top1]) == " Paris" and s.exact and s.prob > 0.3


def _edit(model, tok, prompt: str, new: str, layer: int) -> LowRank:
    path = f"model.layers.{layer}.mlp.down_proj"
    with torch.no_grad(), Trace(model, path, retain_input=True) as tr:
        logits = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    k = tr.input[0, -1].double()
    emb = model.get_input_embeddings().weight.double()
    new_id, top = tok(" " + new, add_special_tokens=False)["input_ids"][0], int(logits.argmax())
    u = emb[new_id] - emb[top] if new_id != top else emb[new_id]
    return LowRank(f"{path}.weight", (30.0 * u / u.norm())[:, None].float(),
                   (k / (k @ k))[:, None].float())


def test_ten_edit_spec_with_200_locality_samples_within_budget(real_model):
    model, tok, facts = real_model.model, real_model.tok, real_model.facts
    rel = Relation(name="capital", prompt=TEMPLATES[0], paraphrases=TEMPLATES[1:],
                   subjects=NEIGHBOURS)
    edits = tuple(TripleEdit(name=s.lower(), subject=s, relation="capital", old=o, new=n)
                  for s, o, n in CAPITALS)
    claims = (Claim(metric="efficacy", threshold=1.0),
              Claim(metric="locality", threshold=0.5, sample=200))
    spec = Spec(relations=(rel,), edits=edits, claims=claims)
    layer = facts.n_layers - 1
    reqs = tuple(EditRequest(name=e.name, prompt=f"The capital of {e.subject} is", subject=e.subject,
                             target_new=e.new, target_old=e.old,
                             scope=(f"{e.subject}'s capital city is",)) for e in edits)
    plan = Plan(kmec_version="t", spec_hash="0" * 64, model="smollm2-135m",
                model_fingerprint=facts.fingerprint, model_arch=facts.arch, seed=0, order="batch",
                steps=(Step(id="s0", backend="test", edits=reqs),))
    art = build_artifact([("s0", [_edit(model, tok, r.prompt, r.target_new, layer) for r in reqs])],
                         base_model="smollm2-135m", base_fingerprint=facts.fingerprint,
                         base_arch=facts.arch, weight_layout="out_in", plan_hash=plan.sha256)
    edited = copy.deepcopy(model)
    apply(art, edited, fingerprint=facts.fingerprint)
    t0 = time.perf_counter()
    report = verify(spec, plan, model, edited, tok, seed=0, artifact=art)
    seconds = time.perf_counter() - t0
    assert seconds < 60, report.timing
    # crude C = I rank-one edits: they move their prompts (and much else, which
    # verify must report), so only the direction of the change is asserted
    france = report.edits[0]
    assert france.base.top[0].token == " Paris"
    assert france.edited.p_target > 10 * france.base.p_target
    assert france.edited.p_old < france.base.p_old
    loc = [c for c in report.claims if c.metric == "locality"]
    assert len(loc) == 10 and all(c.n >= 50 for c in loc)
    assert report.audit.ok and report.capability.ran
    assert report.plus and report.plus[0].example.startswith("The capital of France is Lyon. ")
