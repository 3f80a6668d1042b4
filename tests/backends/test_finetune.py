"""Constrained fine-tuning (``ft``) on tiny models: the edit takes, the norm
bound holds exactly, the base model is untouched, apply → revert is exact,
LoRA payloads are low rank, runs are deterministic, and a free-form edit
without a subject plans to ``ft`` and compiles."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import kmec.compile as kcompile
from kmec.artifacts import apply, audit, build_artifact
from kmec.artifacts.build import read_build
from kmec.artifacts.payloads import Dense, LowRank
from kmec.backends import BACKENDS, get_backend
from kmec.backends.base import ExecContext
from kmec.backends.finetune import FinetuneParams, _Trainer, preserve_prompts
from kmec.errors import BackendError
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.load import LoadedModel, ModelRef, fingerprint_model
from kmec.models.tokens import target_text
from kmec.planner import plan as make_plan
from kmec.planner.model import EditRequest, Step
from kmec.spec import MethodHint, PromptEdit, Spec
from tests.conftest import SpaceLetterTokenizer, build_tiny_model
from tests.conftest import kmec_cli as kmec

EXAMPLE = Path(__file__).resolve().parents[2] / "specs" / "examples" / "finetune.kmec"

LAYERS = (0, 1, 2, 3)
SUBJECTS = ("bcc", "lfx", "zvj")
EDITS = tuple(EditRequest(name=f"e{i}", prompt=f"The key of {s}", subject=s,
                          target_new=chr(65 + i), scope=(f"{s} has the key",))
              for i, s in enumerate(SUBJECTS))
# A tiny random model spreads its probability almost uniformly over the
# vocabulary, so the targets are reached only with a large relative change.
LOOSE = {"max_delta": 3.0, "lr": 0.05, "steps": 80}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend for the shared cores
    yield
    torch.set_num_threads(threads)


def tiny_lm(family: str = "llama") -> LoadedModel:
    """A tiny model whose final norm is scaled up (logits × 20) so that its
    next-token distributions can be peaked, as a trained model's are."""
    model = build_tiny_model(family, seed=5)
    norm = model.get_submodule(adapter_for(model.config.model_type).final_norm)
    with torch.no_grad():
        for t in norm.parameters():
            t.mul_(20)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fingerprint_model(model))
    return LoadedModel(model, SpaceLetterTokenizer(), facts, ModelRef("tiny", "hub", None))


def execute(lm: LoadedModel, edits=EDITS, **params):
    step = Step(id="s01-ft", backend="ft", edits=tuple(edits), layers=LAYERS,
                params=FinetuneParams.model_validate({**LOOSE, **params}).model_dump(mode="json"))
    ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter_for(lm.facts.model_type),
                      facts=lm.facts, seed=0)
    return list(get_backend("ft").execute(step, ctx))


def artifact(lm: LoadedModel, payloads):
    return build_artifact([("s01-ft", payloads)], base_model="tiny",
                          base_fingerprint=lm.facts.fingerprint, base_arch=lm.facts.arch,
                          weight_layout=adapter_for(lm.facts.model_type).weight_layout,
                          plan_hash="h")


@torch.no_grad()
def greedy(lm: LoadedModel, prompt: str) -> int:
    return int(lm.model(torch.tensor([lm.tok.encode(prompt)])).logits[0, -1].argmax())


def target_id(lm: LoadedModel, edit: EditRequest) -> int:
    ids = lm.tok.encode(target_text(edit.prompt, edit.target_new))
    assert len(ids) == 1
    return ids[0]


CASES = [("llama", 0), ("llama", 4), ("gpt2", 0), ("gpt2", 4)]


@pytest.fixture(scope="module")
def runs():
    out = {}
    for family, rank in CASES:
        lm = tiny_lm(family)
        original = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        out[family, rank] = (lm, original, execute(lm, lora_rank=rank))
    return out


@pytest.mark.parametrize("family,rank", CASES)
def test_the_edit_takes_and_revert_is_exact(runs, family, rank):
    lm, original, payloads = runs[family, rank]
    for n, p in lm.model.named_parameters():  # execute never writes the model
        assert torch.equal(p, original[n]), n
    assert all(greedy(lm, e.prompt) != target_id(lm, e) for e in EDITS)
    art = artifact(lm, payloads)
    handle = apply(art, lm.model, fingerprint=lm.facts.fingerprint)
    try:
        assert [greedy(lm, e.prompt) for e in EDITS] == [target_id(lm, e) for e in EDITS]
        base = tiny_lm(family).model
        result = audit(base, lm.model, art)
        assert result.ok, result.summary()
    finally:
        handle.revert()
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, original[n]), n


@pytest.mark.parametrize("family,rank", CASES)
def test_payloads_edit_only_the_step_layers_in_their_layout(runs, family, rank):
    lm, _, payloads = runs[family, rank]
    adapter = adapter_for(family)
    params = dict(lm.model.named_parameters())
    assert [p.param for p in payloads] == [f"{adapter.site('mlp_out', l)}.weight" for l in LAYERS]
    for p in payloads:
        w = params[p.param]
        if rank == 0:
            assert isinstance(p, Dense) and p.delta.shape == w.shape  # storage layout
        else:
            out_dim, in_dim = (w.shape[1], w.shape[0]) if family == "gpt2" else w.shape
            assert isinstance(p, LowRank)
            assert p.u.shape == (out_dim, rank) and p.v.shape == (in_dim, rank)
            assert int(torch.linalg.matrix_rank(p.dense())) <= rank


@pytest.mark.parametrize("rank", [0, 3])
def test_the_norm_bound_holds_exactly(rank):
    lm = tiny_lm()
    bound = 0.05
    payloads = execute(lm, lora_rank=rank, max_delta=bound, steps=8)
    params = dict(lm.model.named_parameters())
    for p in payloads:
        delta = p.delta if isinstance(p, Dense) else p.u.double() @ p.v.double().T
        ratio = float(delta.double().norm() / params[p.param].double().norm())
        assert ratio <= bound
        assert ratio > 0.99 * bound  # the bound is active: the targets need far more


@pytest.mark.parametrize("rank", [0, 2])
def test_two_runs_give_identical_tensors(rank):
    lm = tiny_lm()
    a, b = execute(lm, lora_rank=rank, steps=5), execute(lm, lora_rank=rank, steps=5)
    for x, y in zip(a, b):
        if isinstance(x, Dense):
            assert torch.equal(x.delta, y.delta)
        else:
            assert torch.equal(x.u, y.u) and torch.equal(x.v, y.v)
    c = execute(lm, lora_rank=rank, steps=5, seed=7)
    assert rank == 0 or not torch.equal(a[0].v, c[0].v)  # the seed draws LoRA's A


def test_stops_early_once_every_target_is_reached(caplog):
    lm = tiny_lm()
    with caplog.at_level(logging.INFO, logger="kmec"):
        execute(lm, steps=500, stop_prob=0.2)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ft: "))
    taken = int(line.split()[1])
    assert 0 < taken < 500
    assert "not reached" not in caplog.text


def test_the_model_keeps_no_gradients():
    lm = tiny_lm()
    lm.model.requires_grad_(True)
    execute(lm, steps=2, lora_rank=2)
    assert all(p.grad is None for p in lm.model.parameters())


def test_kl_keeps_a_declared_preserve_prompt():
    lm = tiny_lm()
    anchor = "The key of bcd"  # shares all but the last letter with an edited subject

    def drift(kl_weight):
        edits = [e.model_copy(update={"preserve": (anchor,)}) for e in EDITS]
        art = artifact(lm, execute(lm, edits, kl_weight=kl_weight))
        ids = torch.tensor([lm.tok.encode(anchor)])
        with torch.no_grad():
            before = lm.model(ids).logits[0, -1].log_softmax(-1)
            handle = apply(art, lm.model, check=False)
            after = lm.model(ids).logits[0, -1].log_softmax(-1)
            handle.revert()
        return float((before.exp() * (before - after)).sum())

    assert drift(5.0) < 0.5 * drift(0.0)


def test_fallback_anchors_swap_the_subject():
    e = EDITS[0]
    anchors = preserve_prompts(e, 3)
    assert anchors[-1] == "bcc is a" and len(anchors) == 4
    assert all(a.startswith("The key of ") and "bcc" not in a for a in anchors[:-1])
    free = EditRequest(name="f", prompt="Q: who? A:", target_new="X")
    assert len(preserve_prompts(free, 3)) > 3


def test_a_diverging_loss_is_a_backend_error(monkeypatch):
    lm = tiny_lm()
    monkeypatch.setattr(_Trainer, "_chunk_loss",
                        lambda self, chunk: torch.tensor(math.nan, requires_grad=True))
    with pytest.raises(BackendError, match="diverged") as e:
        execute(lm, steps=3)
    assert "lr" in (e.value.hint or "")


def test_refuses_a_step_without_layers():
    lm = tiny_lm()
    step = Step(id="s01-ft", backend="ft", edits=EDITS, layers=())
    ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter_for("llama"), facts=lm.facts)
    with pytest.raises(BackendError, match="at least one layer"):
        get_backend("ft").execute(step, ctx)


def test_a_free_form_edit_without_subject_plans_to_ft_and_compiles(tmp_path, monkeypatch):
    lm = tiny_lm()
    # larger steps than the defaults (tuned on a trained model), as in LOOSE
    monkeypatch.setattr(type(BACKENDS["ft"]), "default_params",
                        lambda self, facts: FinetuneParams(lr=LOOSE["lr"], steps=LOOSE["steps"]))
    spec = Spec(edits=(PromptEdit(name="q", prompt="Q: key? A:", target="B",
                                  scope=("Q: the key? A:",)),),
                method=MethodHint(max_delta=3.0, layers=LAYERS))
    plan = make_plan(spec, lm.facts, backends=BACKENDS)
    step = plan.steps[0]
    assert step.backend == "ft" and step.needs_stats is None
    assert step.params["max_delta"] == 3.0 and "free-form" in step.reasons[0].because
    monkeypatch.setenv("KMEC_HOME", str(tmp_path))
    art = kcompile.execute(plan, lm, use_cache=False)
    assert fingerprint_model(lm.model) == lm.facts.fingerprint
    handle = apply(art, lm.model, fingerprint=lm.facts.fingerprint)
    try:
        edit = step.edits[0]
        assert greedy(lm, edit.prompt) == target_id(lm, edit)
    finally:
        handle.revert()


@pytest.mark.slow
def test_the_example_spec_compiles_and_verifies_on_the_real_model(real_model, tmp_path):
    r = kmec("compile", str(EXAMPLE), "-o", "build", "--no-cache", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    build = tmp_path / "build"
    plan = json.loads((build / "plan.json").read_text())
    assert [s["backend"] for s in plan["steps"]] == ["ft"]
    assert plan["steps"][0]["params"]["max_delta"] == 0.02
    r = kmec("verify", "build", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((build / "report" / "report.json").read_text())
    assert report["ok"] and report["audit"]["ok"]
    params = dict(real_model.model.named_parameters())
    for p in read_build(build)[3].payloads():
        assert isinstance(p, Dense)
        assert float(p.delta.double().norm()) <= 0.02 * float(params[p.param].double().norm())


def test_protected_neighbours_are_kl_anchors():
    from kmec.backends.finetune import _rows

    tok = SpaceLetterTokenizer()
    e = EDITS[0].model_copy(update={"preserve": ("The door of abc",)})
    _, kl_rows, kl_prompts = _rows(tok, [e], [""], FinetuneParams(), ("The key of bcd",
                                                                      "The door of abc"))
    assert kl_prompts == ["The door of abc", "The key of bcd"] and len(kl_rows) == 2
