"""MEND: records, the gradient factors, edits as hooks vs weights, skipping the lower
blocks, training (loss falls, seeded, resumable), the backend (the edit takes, revert
is exact, the plan records the editor's hash) and, slow, compile + verify on the real
model with a briefly trained editor."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kmec.artifacts import apply, build_artifact
from kmec.backends import BACKENDS
from kmec.backends.base import ExecContext
from kmec.backends.mend import (
    DataInfo,
    EditorConfig,
    EditorNet,
    EditRecord,
    Mend,
    TrainConfig,
    find_editor,
    load_editor,
    read_records,
    split_records,
    train_editor,
)
from kmec.backends.mend.edit import base_pass, edited, scored_logp, tokenize
from kmec.backends.mend.lower import collect_lower, skipping_lower
from kmec.backends.mend.store import planner_editors
from kmec.errors import BackendError, KmecError
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.hooks import get_module
from kmec.models.load import fingerprint_model
from kmec.planner import plan as make_plan
from kmec.planner.model import EditRequest, Step
from kmec.spec import MethodHint, PromptEdit, Spec
from tests.conftest import FAMILIES, SpaceLetterTokenizer, build_tiny_model

DATA = Path(__file__).parents[1] / "data" / "fixtures"
TRAIN_48 = Path(__file__).parent / "fixtures" / "zsre_mend_train_48.json"
LAYERS = (1, 2, 3)
WORDS = ("bcc", "lfx", "zvj", "itg", "tbs", "vfn", "qrd", "mkp", "wha", "yoe", "gul", "dsi")


def records(n: int = 24) -> list[EditRecord]:
    """Edits on a tiny model: '<word> is' -> a capital letter (one token)."""
    out = []
    for i in range(n):
        w, other = WORDS[i % len(WORDS)] + "xyz"[i // len(WORDS)], WORDS[(i + 5) % len(WORDS)]
        out.append(EditRecord(prompt=f"The key of {w} is", target=chr(65 + i % 26),
                              rephrase=f"{w} has the key", loc=f"The door of {other} is"))
    return out


def tiny(family: str = "llama"):
    model = build_tiny_model(family, seed=3)
    facts = facts_from_config(model.config, name=f"tiny-{family}",
                              fingerprint=fingerprint_model(model))
    return model, SpaceLetterTokenizer(), facts


DATA_INFO = DataInfo(path="records", sha256="0" * 64, dataset="zsre", records=24, train=20,
                     held_out=4)
FAST = TrainConfig(steps=12, batch=4, lr=3e-3, log_every=4, checkpoint_every=4, max_len=48,
                   text_pool=16, editor=EditorConfig(rank=16))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend for the shared cores
    yield tmp_path / "home"
    torch.set_num_threads(threads)


def train(model, tok, facts, config=FAST, **kw):
    recs = records()
    return train_editor(model, tok, facts, recs[:20], layers=LAYERS, config=config,
                        data=DATA_INFO, held_out=recs[20:], **kw)


# ---------------------------------------------------------------- records


def test_reads_zsre_and_both_counterfact_formats():
    name, zs = read_records(DATA / "zsre_mend_eval.json")
    assert name == "zsre" and zs[0].prompt.endswith("?") and zs[0].rephrase and zs[0].loc_ans
    name, cf = read_records(DATA / "counterfact.json")
    assert name == "counterfact"
    assert cf[0].prompt == "The mother tongue of Danielle Darrieux is" and cf[0].target == "English"
    assert cf[0].loc_ans == "French" and "Danielle Darrieux" in cf[0].rephrase
    name, flat = read_records(DATA / "counterfact-edit.json")
    assert name == "counterfact" and all(r.loc and r.rephrase for r in flat)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(KmecError, match="no such file"):
        read_records(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(KmecError, match="neither zsRE .* nor CounterFact"):
        read_records(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(KmecError, match="not JSON"):
        read_records(tmp_path / "bad.json")
    with pytest.raises(KmecError, match="cannot hold out"):
        split_records(records(3), 3)


# ---------------------------------------------------------------- the maths


def test_untrained_editor_is_the_identity():
    net = EditorNet(6, 4, 2, EditorConfig(rank=3))
    u, d = torch.randn(5, 6), torch.randn(5, 4)
    u2, d2 = net(1, u, d)
    assert torch.equal(u2, u) and torch.equal(d2, d)
    net.observe(1, u, d)  # with statistics, the identity acts on normalised features
    z = torch.cat([u, d], 1)
    u3, d3 = net(1, u, d)
    expect = (z - z.mean(0)) / (z.std(0) + 1e-7)
    assert torch.allclose(torch.cat([u3, d3], 1), expect, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_factors_sum_to_the_weight_gradient(family):
    """Σ_t δ_t u_tᵀ from one pass equals autograd's gradient of the summed NLL wrt W."""
    model, tok, facts = tiny(family)
    adapter = adapter_for(facts.model_type)
    rows = tokenize(tok, [(r.prompt, r.target) for r in records(3)])
    base = base_pass(model, adapter, LAYERS, rows, torch.arange(3))
    ref = copy.deepcopy(model)
    weights = [get_module(ref, adapter.site("mlp_out", layer)).weight for layer in LAYERS]
    for w in weights:
        w.requires_grad_(True)
    from kmec.backends.mend.edit import row_nll

    row_nll(scored_logp(ref, rows), rows).sum().backward()
    for layer, w in zip(LAYERS, weights):
        g = torch.einsum("rto,rti->oi", base.delta[layer], base.u[layer])  # [out, in]
        g = g if adapter.weight_layout == "out_in" else g.T
        assert torch.allclose(g, w.grad, atol=1e-6, rtol=1e-4), (family, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_edit_equals_the_weight_edit(family):
    """The per-row hook (x Uᵀ) D and the LowRank payload Dᵀ U applied to W agree."""
    model, tok, facts = tiny(family)
    adapter = adapter_for(facts.model_type)
    rows = tokenize(tok, [("The key of bcc is", "Q"), ("lfx has the key", "Q")])
    g = torch.Generator().manual_seed(0)
    factors = {layer: (torch.randn(1, 4, facts.d_mlp, generator=g) * 0.1,
                       torch.randn(1, 4, facts.d_model, generator=g) * 0.1) for layer in LAYERS}
    with torch.no_grad(), edited(model, adapter, factors, torch.tensor([0, 0])):
        hooked = scored_logp(model, rows)
    payloads = [_low_rank(adapter, layer, u, d) for layer, (u, d) in factors.items()]
    art = build_artifact([("s", payloads)], base_model="t", base_fingerprint="",
                         base_arch="x", weight_layout=adapter.weight_layout, plan_hash="h")
    handle = apply(art, model, check=False)
    with torch.no_grad():
        weighted = scored_logp(model, rows)
    handle.revert()
    assert torch.allclose(hooked, weighted, atol=1e-4)


def test_grouped_edits_are_the_sum_of_their_updates():
    from kmec.backends.mend.edit import group_factors

    g = torch.Generator().manual_seed(1)
    factors = {5: (torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 2, generator=g))}
    (U, D), = group_factors(factors, 2).values()
    assert U.shape == (2, 8, 6) and D.shape == (2, 8, 2)
    dense = [d.T @ u for u, d in zip(U, D)]  # ΔW of each group, [out, in]
    one = [d.T @ u for u, d in zip(*factors[5])]
    assert torch.allclose(dense[0], one[0] + one[1], atol=1e-5)
    assert torch.allclose(dense[1], one[2], atol=1e-5)  # a short last group is padded


def _low_rank(adapter, layer, U, D):
    from kmec.artifacts.payloads import LowRank

    return LowRank(f"{adapter.site('mlp_out', layer)}.weight", D[0].T.contiguous(),
                   U[0].T.contiguous())


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_the_lower_blocks_is_exact(family):
    model, tok, facts = tiny(family)
    adapter = adapter_for(facts.model_type)
    texts = [("The key of bcc is", "Q"), ("The door of zvj is", None)]
    cache = collect_lower(model, tok, adapter, 2, [(i, p, t) for i, (p, t) in enumerate(texts)])
    rows = tokenize(tok, texts)
    with torch.no_grad():
        full = scored_logp(model, rows)
        with skipping_lower(model, adapter, 2, cache.batch([0, 1], rows.input_ids.shape[1])):
            fast = scored_logp(model, rows)
        again = scored_logp(model, rows)  # the blocks compute again afterwards
    assert torch.allclose(full, fast, atol=1e-5) and torch.equal(full, again)


# ---------------------------------------------------------------- training


def test_training_reduces_the_loss_and_saves_the_editor(home):
    model, tok, facts = tiny()
    before = fingerprint_model(model)
    assert planner_editors(facts.fingerprint) == ()  # none before training
    res = train(model, tok, facts, config=FAST.model_copy(update={"steps": 40, "log_every": 10}))
    curve = res.manifest.metrics["curve"]
    assert [p["step"] for p in curve] == [10, 20, 30, 40]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert fingerprint_model(model) == before  # training never touches the model
    m = find_editor(facts.fingerprint)
    assert m is not None and m.sha256 == res.manifest.sha256 and m.layers == LAYERS
    assert planner_editors(facts.fingerprint) == (facts.fingerprint,)
    assert planner_editors("0" * 64) == () and planner_editors("") == ()
    assert m.metrics["held_out"]["n"] == 4 and m.metrics["seconds"] > 0
    assert (home / "editors" / facts.fingerprint / "editor.safetensors").exists()


def test_training_is_seeded():
    model, tok, facts = tiny()
    a = train(model, tok, facts, resume=False).manifest.sha256
    b = train(model, tok, facts, resume=False).manifest.sha256
    c = train(model, tok, facts, config=FAST.model_copy(update={"seed": 1}),
              resume=False).manifest.sha256
    assert a == b != c


def test_resume_continues_the_step_count():
    model, tok, facts = tiny()
    straight = train(model, tok, facts, config=FAST.model_copy(update={"steps": 8}), resume=False)
    half = train(model, tok, facts, config=FAST.model_copy(update={"steps": 4}), resume=False)
    assert half.manifest.metrics["steps"] == 4
    rest = train(model, tok, facts, config=FAST.model_copy(update={"steps": 8}))
    assert rest.resumed_from == 4 and rest.manifest.metrics["steps"] == 8
    assert [p["step"] for p in rest.manifest.metrics["curve"]] == [4, 8]
    for k, v in straight.net.state_dict().items():
        assert torch.allclose(v, rest.net.state_dict()[k], atol=1e-6), k
    fresh = train(model, tok, facts, config=FAST.model_copy(update={"steps": 8}), resume=False)
    assert fresh.resumed_from == 0


# ---------------------------------------------------------------- the backend


def _step(editor: str, edits, layers=LAYERS) -> Step:
    return Step(id="s01-mend", backend="mend", edits=tuple(edits), layers=layers,
                params={"editor": editor})


def _prob(model, tok, prompt, target) -> float:
    rows = tokenize(tok, [(prompt, target)])
    with torch.no_grad():
        lp = scored_logp(model, rows)
    return float(lp[0, rows.targets[0]].exp())


def test_edit_takes_and_revert_is_exact():
    model, tok, facts = tiny()
    sha = train(model, tok, facts, config=FAST.model_copy(update={"steps": 30})).manifest.sha256
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    edit = EditRequest(name="e", prompt="The key of qrdz is", target_new="W")
    ctx = ExecContext(model=model, tok=tok, adapter=adapter_for("llama"), facts=facts)
    payloads = Mend().execute(_step(sha, [edit]), ctx)
    assert fingerprint_model(model) == facts.fingerprint  # execute never changes the model
    assert len(payloads) == 3 and all(p.u.shape[1] == p.v.shape[1] for p in payloads)
    art = build_artifact([("s01-mend", payloads)], base_model="tiny",
                         base_fingerprint=facts.fingerprint, base_arch=facts.arch,
                         weight_layout="out_in", plan_hash="h")
    p0 = _prob(model, tok, edit.prompt, "W")
    handle = apply(art, model)
    p1 = _prob(model, tok, edit.prompt, "W")
    handle.revert()
    assert p1 > p0 * 2, (p0, p1)
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n


def test_many_edits_add_up_with_rank_capped_at_d_out():
    """Edits in one step add their updates; more tokens than d_model are folded by a QR."""
    model, tok, facts = tiny()
    sha = train(model, tok, facts, config=FAST.model_copy(update={"steps": 30})).manifest.sha256
    edits = [EditRequest(name=f"e{i}", prompt=f"The key of {w}q is", target_new=chr(80 + i))
             for i, w in enumerate(WORDS[:4])]
    ctx = ExecContext(model=model, tok=tok, adapter=adapter_for("llama"), facts=facts)
    together = Mend().execute(_step(sha, edits), ctx)
    alone = [Mend().execute(_step(sha, [e]), ctx) for e in edits]
    assert all(p.u.shape[1] == facts.d_model for p in together)  # 4 × 18 tokens > 32
    for i, p in enumerate(together):
        summed = sum(a[i].dense() for a in alone)
        assert torch.allclose(p.dense(), summed, atol=1e-4 * float(summed.abs().max()))


def test_execute_refuses_a_missing_or_changed_editor():
    model, tok, facts = tiny()
    ctx = ExecContext(model=model, tok=tok, adapter=adapter_for("llama"), facts=facts)
    edit = EditRequest(name="e", prompt="The key of bcc is", target_new="W")
    with pytest.raises(BackendError, match="no trained MEND editor") as e:
        Mend().execute(_step("", [edit]), ctx)
    assert "kmec train-editor" in str(e.value)
    train(model, tok, facts, config=FAST.model_copy(update={"steps": 2}))
    with pytest.raises(BackendError, match="not the one this plan was made with"):
        Mend().execute(_step("f" * 64, [edit]), ctx)
    sha = find_editor(facts.fingerprint).sha256
    with pytest.raises(BackendError, match="edits layers"):
        Mend().execute(_step(sha, [edit], layers=(0,)), ctx)


def test_plan_records_the_editor_hash():
    model, tok, facts = tiny()
    spec = Spec(model="tiny", method=MethodHint(),
                edits=(PromptEdit(name="e", prompt="The key of bcc is", target="W",
                                  subject="bcc"),))
    assert make_plan(spec, facts, backends=BACKENDS).steps[0].backend != "mend"
    train(model, tok, facts, config=FAST.model_copy(update={"steps": 2}))
    first = make_plan(spec, facts, backends=BACKENDS, editors=(facts.fingerprint,))
    step = first.steps[0]
    assert step.backend == "mend" and step.layers == LAYERS
    assert step.params["editor"] == find_editor(facts.fingerprint).sha256
    train(model, tok, facts, config=FAST.model_copy(update={"steps": 3}))  # retrained
    second = make_plan(spec, facts, backends=BACKENDS, editors=(facts.fingerprint,))
    assert second.steps[0].params["editor"] != step.params["editor"]
    assert second.sha256 != first.sha256
    assert load_editor(facts.fingerprint).manifest.sha256 == second.steps[0].params["editor"]


# ---------------------------------------------------------------- CLI


def kmec_cli(*args, home):
    env = {**os.environ, "KMEC_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                          env=env, check=False)


def test_cli_errors_and_empty_list(tmp_path, home):
    r = kmec_cli("train-editor", "--model", "smollm2-135m", "--data",
                 str(tmp_path / "missing.json"), home=home)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = kmec_cli("editors", home=home)
    assert r.returncode == 0 and "no trained editors" in r.stdout


# ---------------------------------------------------------------- slow: the real model

EXAMPLE = Path(__file__).parents[2] / "specs" / "examples" / "mend.kmec"


@pytest.fixture(scope="session")
def trained_home(real_model, tmp_path_factory):
    """A KMEC_HOME holding a short-trained editor for the real model (models shared)."""
    from kmec.models.load import kmec_home

    models = kmec_home() / "models"
    home = tmp_path_factory.mktemp("mend-home")
    (home / "models").symlink_to(models, target_is_directory=True)
    _, recs = read_records(TRAIN_48)
    train_recs, held = split_records(recs, 8)
    info = DataInfo(path=str(TRAIN_48), sha256="fixture", dataset="zsre", records=48, train=40,
                    held_out=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KMEC_HOME", str(home))
        res = train_editor(real_model.model, real_model.tok, real_model.facts, train_recs,
                           layers=(27, 28, 29),
                           config=TrainConfig(steps=40, log_every=10, text_pool=64),
                           data=info, held_out=held)
    return home, res


@pytest.mark.slow
def test_real_editor_edits_held_out_records(trained_home):
    _, res = trained_home
    held = res.manifest.metrics["held_out"]
    assert held["n"] == 8 and held["efficacy"] >= 0.8 > held["efficacy_before"]
    assert held["prob_up"] == 1.0


@pytest.mark.slow
def test_compile_and_verify_with_mend_on_the_real_model(trained_home, tmp_path):
    home, res = trained_home
    (tmp_path / "mend.kmec").write_text(EXAMPLE.read_text())
    env = {**os.environ, "KMEC_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, check=False)

    r = run("compile", "mend.kmec", "-o", "build")
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "build" / "plan.json").read_text())
    assert [s["backend"] for s in plan["steps"]] == ["mend"]
    assert plan["steps"][0]["params"]["editor"] == res.manifest.sha256
    assert plan["steps"][0]["layers"] == [27, 28, 29]
    r = run("verify", "build")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "build" / "report" / "report.json").read_text())
    assert report["ok"] and report["audit"]["ok"]
