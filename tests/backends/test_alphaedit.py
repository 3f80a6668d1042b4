"""AlphaEdit: the projected update's math, a sequence of edits through
``kmec.compile.execute`` on a tiny Llama, the base model left untouched,
apply → revert exact, and the planner's ``protect`` lists."""

from __future__ import annotations

import pytest
import torch

import kmec.compile as kcompile
from kmec.artifacts import apply, audit, build_artifact
from kmec.backends import BACKENDS, get_backend
from kmec.backends.alphaedit import null_space, null_space_update
from kmec.backends.base import ExecContext
from kmec.errors import BackendError
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.hooks import TraceDict
from kmec.models.load import LoadedModel, ModelRef, fingerprint_model
from kmec.models.tokens import target_text
from kmec.planner import plan as make_plan
from kmec.planner.model import EditRequest, Plan, StatsRequest, Step
from kmec.spec import MethodHint, PromptEdit, Spec
from tests.conftest import SpaceLetterTokenizer, build_tiny_model
from tests.planner.helpers import FACTS

LAYERS = (0, 1, 2)
REL = 0.1
VALUE = {"steps": 60, "weight_decay": 0.0, "clamp": 1e4}
# Subjects end in distinct letters: in a tiny random model a subject's key is
# mostly its last token, so a shared last letter makes two edits one key.
SUBJECTS = ("bcc", "lfx", "zvj", "itg", "tbs", "vfn")
EDITS = tuple(EditRequest(name=f"e{i}", prompt=f"The key of {s}", subject=s, target_new=chr(65 + i))
              for i, s in enumerate(SUBJECTS))


class CorpusStats:
    """Second moments from random token sequences (the tiny model's "corpus")."""

    def __init__(self, model, adapter, layers):
        self.ids = torch.randint(1, 127, (8, 32), generator=torch.Generator().manual_seed(1))
        paths = [adapter.site("mlp_out", l) for l in layers]
        with torch.no_grad(), TraceDict(model, paths, retain_input=True, stop=True) as td:
            model(self.ids)
        self.c = {}
        for l, p in zip(layers, paths):
            k = td[p].input.reshape(-1, td[p].input.shape[-1]).double()
            self.c[l] = (k.T @ k / k.shape[0]).float()

    def second_moment(self, layer):
        return self.c[layer]


# ---------------------------------------------------------------- math


def test_update_leaves_preserved_keys_and_moves_new_keys():
    g = torch.Generator().manual_seed(0)
    d, d_out, n, m = 24, 10, 3, 4
    # preserved keys K0 live mostly in an 8-dimensional subspace
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    scales = torch.cat([torch.full((8,), 3.0), torch.full((d - 8,), 0.01)])
    k0 = (torch.randn(2000, d, generator=g) * scales) @ basis.T
    c = k0.T @ k0 / k0.shape[0]
    u_null, energy = null_space(c, 1e-2)
    assert u_null.shape == (d, d - 8) and energy > 0
    k1, r = torch.randn(n, d, generator=g), torch.randn(n, d_out, generator=g)
    kp = torch.randn(m, d, generator=g)
    alpha = 1e-3
    u, v = null_space_update(k1, r, u_null, kp, alpha)
    delta = u @ v.T
    # Δ K0 ≈ 0: no change along C's preserved (large-eigenvalue) directions ...
    evals, evecs = torch.linalg.eigh(c.double())
    big = evecs[:, evals >= 1e-2 * evals.max()].float()
    assert big.shape[1] == 8 and (delta @ big).norm() < 1e-5 * delta.norm()
    assert (k0 @ delta.T).norm() / k0.norm() < 0.02 * (k1 @ delta.T).norm() / k1.norm()
    # ... while the new keys move to their targets (n + m ≪ d - 8: room for both)
    assert (k1 @ delta.T - r).norm() < 0.05 * r.norm()
    # and the earlier edits' keys stay put, unlike without protecting them
    u0, v0 = null_space_update(k1, r, u_null, None, alpha)
    assert (kp @ delta.T).norm() < 0.05 * (kp @ (u0 @ v0.T).T).norm()


def test_update_equals_the_papers_closed_form():
    g = torch.Generator().manual_seed(1)
    d, d_out = 12, 5
    a = torch.randn(200, d, generator=g) * torch.linspace(0.01, 2.0, d)
    c = a.T @ a / 200
    k1, r = torch.randn(2, d, generator=g), torch.randn(2, d_out, generator=g)
    kp = torch.randn(3, d, generator=g)
    u_null, _ = null_space(c, 0.05)
    p = (u_null @ u_null.T).double()
    alpha = 0.5
    K1, R, Kp = k1.double().T, r.double().T, kp.double().T
    eye = torch.eye(d, dtype=torch.float64)
    paper = R @ K1.T @ p @ torch.linalg.inv(Kp @ Kp.T @ p + K1 @ K1.T @ p + alpha * eye)
    u, v = null_space_update(k1, r, u_null, kp, alpha)
    assert torch.allclose((u @ v.T).double(), paper, atol=1e-4)
    assert torch.allclose(paper, paper @ p, atol=1e-6)  # Δ = Δ P: applied without another P


def test_covariance_term_minimises_its_objective_and_spares_the_preserved_keys():
    """cov_rel: M gains λ ÛᵀCÛ, so Δ = Y Ûᵀ minimises ‖ΔK1 − R‖² + ‖ΔKp‖² + λ tr(ΔCΔᵀ)
    + α‖Y‖²; a larger λ moves the preserved keys less (the spectrum inside the null
    space is not flat: a small model's null space is not empty)."""
    g = torch.Generator().manual_seed(3)
    d, d_out = 16, 4
    a = torch.randn(500, d, generator=g) * torch.logspace(-2, 0.5, d)
    c = a.T @ a / 500
    u_null, _ = null_space(c, 0.3)
    k1, r = torch.randn(3, d, generator=g), torch.randn(3, d_out, generator=g)
    kp = torch.randn(2, d, generator=g)
    alpha, lam = 1e-3, 0.7
    u, v = null_space_update(k1, r, u_null, kp, alpha, c, lam)
    U, K1, Kp, R, C = (t.double() for t in (u_null, k1.T, kp.T, r.T, c))
    m = U.T @ (K1 @ K1.T + Kp @ Kp.T + lam * C) @ U + alpha * torch.eye(U.shape[1],
                                                                           dtype=torch.float64)
    y = R @ K1.T @ U @ torch.linalg.inv(m)
    assert torch.allclose((u @ v.T).double(), y @ U.T, atol=5e-3)  # float32 basis and keys
    assert torch.allclose(*(x.double() for x in null_space_update(k1, r, u_null, kp, alpha,
                                                                  c, 0.0)[1:]),
                          null_space_update(k1, r, u_null, kp, alpha)[1].double())

    def moved(lam_):
        u_, v_ = null_space_update(k1, r, u_null, kp, alpha, c, lam_)
        delta = u_ @ v_.T
        return float((a @ delta.T).norm())

    assert moved(10 * lam) < moved(lam) < moved(0.0)


def test_no_projection_is_a_ridge_update():
    g = torch.Generator().manual_seed(2)
    k1, r = torch.randn(2, 6, generator=g), torch.randn(2, 3, generator=g)
    u, v = null_space_update(k1, r, None, None, 0.3)
    ridge = r.T @ k1 @ torch.linalg.inv(k1.T @ k1 + 0.3 * torch.eye(6))
    assert torch.allclose(u @ v.T, ridge, atol=1e-5)


# ---------------------------------------------------------------- a sequence on a tiny model


def tiny_lm():
    model = build_tiny_model("llama", seed=5)
    fp = fingerprint_model(model)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fp)
    return LoadedModel(model, SpaceLetterTokenizer(), facts, ModelRef("tiny", "hub", None))


def sequence_plan(lm, **params) -> Plan:
    protect = params.pop("protect", True)
    steps = []
    for i, e in enumerate(EDITS):
        earlier = [{"name": x.name, "prompt": x.prompt, "subject": x.subject} for x in EDITS[:i]]
        steps.append(Step(id=f"s{i + 1:02d}-alphaedit", backend="alphaedit", edits=(e,),
                          layers=LAYERS,
                          needs_stats=StatsRequest(layers=LAYERS, tokens=256, max_len=32),
                          params={"value": VALUE, "protect": earlier if protect else [], **params}))
    return Plan(kmec_version="test", spec_hash="s", model="tiny",
                model_fingerprint=lm.facts.fingerprint, model_arch="LlamaForCausalLM", seed=0,
                order="sequence", steps=tuple(steps))


def margin(lm, edit) -> float:
    """log P(target) − the best other token's log-probability after the prompt."""
    with torch.no_grad():
        lp = lm.model(torch.tensor([lm.tok.encode(edit.prompt)])).logits[0, -1].log_softmax(-1)
    t = lm.tok.encode(target_text(edit.prompt, edit.target_new))
    assert len(t) == 1
    other = lp.clone()
    other[t[0]] = -float("inf")
    return float(lp[t[0]] - other.max())


def retention(lm, art):
    """(margins right after each edit's own step, margins after all steps)."""
    per = len(art.payloads()) // len(EDITS)
    handles, first = [], []
    for i, e in enumerate(EDITS):
        one = build_artifact([(f"s{i}", art.payloads()[i * per:(i + 1) * per])], base_model="tiny",
                             base_fingerprint="", base_arch="x", weight_layout="out_in",
                             plan_hash="h")
        handles.append(apply(one, lm.model, check=False))
        first.append(margin(lm, e))
    last = [margin(lm, e) for e in EDITS]
    for h in reversed(handles):
        h.revert()
    return first, last


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sequence compiled with AlphaEdit and with the no-projection,
    no-protection contrast (plain sequential ridge updates)."""
    lm = tiny_lm()
    stats = CorpusStats(lm.model, adapter_for("llama"), LAYERS)
    original = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out = {"lm": lm, "stats": stats, "original": original}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend for the shared cores
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KMEC_HOME", str(tmp_path_factory.mktemp("kmec-home")))
            mp.setattr(kcompile, "stats_for_step", lambda step, lm, progress=None: stats)
            for name, params in (("alphaedit", {"null_space_rel": REL}),
                                 ("contrast", {"project": False, "protect": False})):
                out[name] = kcompile.execute(sequence_plan(lm, **params), lm, use_cache=False)
    finally:
        torch.set_num_threads(threads)
    return out


def test_execute_leaves_the_base_model_bit_identical(runs):
    lm = runs["lm"]
    assert fingerprint_model(lm.model) == lm.facts.fingerprint
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, runs["original"][n]), n


def test_payloads_do_not_touch_the_preserved_subspace(runs):
    """Every executed update satisfies Δ U_big = 0 (U_big: C's large-eigenvalue
    directions); the contrast's updates do not."""
    def leak(art):
        worst = 0.0
        for p in art.payloads():
            layer = int(p.param.split(".")[2])
            c = runs["stats"].second_moment(layer).double()
            evals, evecs = torch.linalg.eigh(c)
            big = evecs[:, evals >= REL * evals.max()].float()
            worst = max(worst, float((p.dense() @ big).norm() / p.dense().norm()))
        return worst

    assert len(runs["alphaedit"].payloads()) == len(EDITS) * len(LAYERS)
    assert leak(runs["alphaedit"]) < 1e-4
    assert leak(runs["contrast"]) > 0.1


def test_later_edits_do_not_undo_earlier_ones(runs):
    """Each earlier edit's margin barely moves after the later steps, unlike
    with plain sequential ridge updates. (On a tiny model the difference comes
    from the protected keys Kp; the projection is tested on the payloads above.)"""
    lm = runs["lm"]
    first, last = retention(lm, runs["alphaedit"])
    c_first, c_last = retention(lm, runs["contrast"])
    drop = sum(a - b for a, b in zip(first[:-1], last[:-1])) / (len(EDITS) - 1)
    c_drop = sum(a - b for a, b in zip(c_first[:-1], c_last[:-1])) / (len(EDITS) - 1)
    assert sum(m > 0 for m in first) == len(EDITS)  # every edit takes when it is made
    assert sum(m > 0 for m in last) == len(EDITS)  # and all still hold at the end
    assert drop < 0.02 and drop + 0.05 < c_drop


def test_apply_then_revert_is_exact(runs):
    lm, art = runs["lm"], runs["alphaedit"]
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    handle = apply(art, lm.model, fingerprint=lm.facts.fingerprint)
    assert all(margin(lm, e) > 0 for e in EDITS)
    assert audit(build_tiny_model("llama", seed=5), lm.model, art).ok
    handle.revert()
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n


# ---------------------------------------------------------------- errors, cache, planner


def ctx_for(lm, stats, tmp_path):
    return ExecContext(model=lm.model, tok=lm.tok, adapter=adapter_for("llama"), facts=lm.facts,
                       stats=stats, cache_dir=tmp_path, seed=0)


def test_refuses_without_stats_or_null_space(tmp_path):
    lm = tiny_lm()
    step = Step(id="s01-alphaedit", backend="alphaedit", edits=EDITS[:1], layers=(1,),
                params={"value": {"steps": 1}})
    with pytest.raises(BackendError, match="needs key statistics"):
        get_backend("alphaedit").execute(step, ctx_for(lm, None, tmp_path))
    stats = CorpusStats(lm.model, adapter_for("llama"), (1,))
    tiny = step.model_copy(update={"params": {"value": {"steps": 1}, "null_space_rel": 1e-9}})
    with pytest.raises(BackendError, match="no eigenvalue of C") as e:
        get_backend("alphaedit").execute(tiny, ctx_for(lm, stats, tmp_path))
    assert "null_space_rel" in (e.value.hint or "")


def test_null_space_is_cached_by_content(tmp_path):
    lm = tiny_lm()
    stats = CorpusStats(lm.model, adapter_for("llama"), (1,))
    step = Step(id="s01-alphaedit", backend="alphaedit", edits=EDITS[:1], layers=(1,),
                params={"value": {"steps": 2}, "null_space_rel": REL})
    a = get_backend("alphaedit").execute(step, ctx_for(lm, stats, tmp_path))
    assert len(list((tmp_path / "alphaedit").glob("*.safetensors"))) == 1
    b = get_backend("alphaedit").execute(step, ctx_for(lm, stats, tmp_path))
    assert torch.equal(a[0].u, b[0].u) and torch.equal(a[0].v, b[0].v)  # deterministic, cache hit


def test_planner_lists_earlier_edits_to_protect():
    edits = tuple(PromptEdit(name=n, prompt=f"The capital of {s} is", target=t, subject=s)
                  for n, s, t in (("a", "France", "Lyon"), ("b", "Spain", "Porto"),
                                  ("c", "Italy", "Milan")))
    seq = make_plan(Spec(order="sequence", edits=edits), FACTS["smollm2"], backends=BACKENDS)
    assert [s.backend for s in seq.steps] == ["alphaedit"] * 3
    assert [[q["name"] for q in s.params["protect"]] for s in seq.steps] == [[], ["a"], ["a", "b"]]
    assert seq.steps[2].params["protect"][1] == {"name": "b", "prompt": "The capital of Spain is",
                                                 "subject": "Spain"}
    assert any("protects the keys of the 2 earlier edit(s)" in r.because
               for r in seq.steps[2].reasons)
    batch = make_plan(Spec(edits=edits, method=MethodHint(method="alphaedit")), FACTS["smollm2"],
                      backends=BACKENDS)
    assert len(batch.steps) == 1 and batch.steps[0].params["protect"] == []
