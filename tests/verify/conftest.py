"""Fixtures for verify tests: a wide tiny Llama, a small spec, hand-made artifacts.

The tiny model has a wide MLP (2048) so that a *targeted* rank-one edit can be
built by hand: its key direction ``v`` is orthogonal to the MLP keys of every
prompt a locality check can draw (and of every corpus-slice position), so the
edit moves the edit prompt and nothing that is checked for locality.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kmec.artifacts import Artifact, build_artifact
from kmec.artifacts.payloads import LowRank
from kmec.hashing import spec_hash
from kmec.models.facts import facts_from_config
from kmec.models.hooks import Trace
from kmec.models.load import fingerprint_model
from kmec.planner.model import EditRequest, Plan, Step
from kmec.spec import Claim, Relation, Spec, TripleEdit
from kmec.verify import canaries
from kmec.verify.claims import build_cases, in_scope
from kmec.verify.strategies import neighbour_space
from tests.conftest import ByteTokenizer

LAYER = 1
PARAM = f"model.layers.{LAYER}.mlp.down_proj.weight"
PROMPT = "The capital of France is "
SUBJECTS = ("Spain", "Italy", "Peru", "Chile", "Kenya", "Norway")


def wide_llama(seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2048, vocab_size=128,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    model.requires_grad_(False)
    return model


def make_spec(old: str, new: str, claims: tuple[Claim, ...], *, seed: int = 0) -> Spec:
    rel = Relation(name="capital", prompt="The capital of {{ subject }} is ",
                   paraphrases=("{{ subject }}'s capital is ",),
                   reverse="{{ object }} is the capital of ", subjects=SUBJECTS)
    lang = Relation(name="language", prompt="The language of {{ subject }} is ")
    edit = TripleEdit(name="france", subject="France", relation="capital", old=old, new=new,
                      preserve=("The Eiffel Tower is in ",))
    return Spec(model="tiny", seed=seed, relations=(rel, lang), edits=(edit,), claims=claims)


def make_plan(spec: Spec, fingerprint: str) -> Plan:
    e = spec.edits[0]
    req = EditRequest(name=e.name, prompt=PROMPT, subject="France", target_new=e.new,
                      target_old=e.old, scope=("France's capital is ",))
    step = Step(id="s00-rome", backend="rome", edits=(req,), layers=(LAYER,), writes=(PARAM,))
    return Plan(kmec_version="0.1.0", spec_hash=spec_hash(spec), model="tiny",
                model_fingerprint=fingerprint,
                model_arch="LlamaForCausalLM", seed=spec.seed, order="batch", steps=(step,))


def keys(model: Any, tok: Any, texts: list[str], *, last_only: bool) -> torch.Tensor:
    """MLP keys at PARAM: each text's last position, or all its positions (<= 128)."""
    ids = [tok(t)["input_ids"][:128] for t in texts]
    width = max(len(x) for x in ids)
    batch = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    with torch.no_grad(), Trace(model, PARAM.removesuffix(".weight"), retain_input=True) as tr:
        model(batch)
    rows = [tr.input[i, len(x) - 1:len(x)] if last_only else tr.input[i, :len(x)]
            for i, x in enumerate(ids)]
    return torch.cat(rows).double()


def checked_prompts(spec: Spec, plan: Plan) -> list[str]:
    """Every prompt a locality check on this spec can look at."""
    cases = build_cases(spec, plan)
    out = list(cases[0].preserve) + list(canaries.GENERAL_QUESTIONS)
    for claim in spec.claims:
        if claim.metric != "locality":
            continue
        space = neighbour_space(spec, cases[0], claim, cases, in_scope(cases))
        from kmec.grammar.templates import render
        out += [render(t, subject=s) for t in space.templates for s in space.subjects]
        out += list(space.subject_prompts) + list(space.questions)
        for sent in space.sentences:
            w = sent.split()
            out += [" ".join(w[:k]) for k in range(min(3, len(w)), len(w) + 1)]
    return [p for p in dict.fromkeys(out) if p not in in_scope(cases)]


def targeted(model: Any, tok: Any, avoid: list[str], new: str, old: str, *, alpha: float = 60.0,
             victim: str | None = None) -> LowRank:
    """A rank-one edit on PARAM that moves PROMPT towards ``new`` and leaves the
    last-position keys of ``avoid`` (and all corpus-slice positions) untouched;
    ``victim`` (a prompt left out of ``avoid``) is hit as hard as the edit prompt."""
    k = keys(model, tok, [PROMPT], last_only=True)[0]
    K = torch.cat([keys(model, tok, avoid, last_only=True),
                   keys(model, tok, list(canaries.CORPUS_SLICE), last_only=False)])
    q = torch.linalg.qr(K.T)[0]
    def perp(x: torch.Tensor) -> torch.Tensor:
        return x - q @ (q.T @ x)
    v = perp(k)
    v = v / (v @ k)
    if victim is not None:
        kv = keys(model, tok, [victim], last_only=True)[0]
        w = perp(kv) - perp(kv) @ v / (v @ v) * v  # orthogonal to v and to the avoided keys
        w = w / (w @ kv)
        v = v + 20 * w
    emb = model.get_input_embeddings().weight.double()
    u = alpha * (emb[tok.encode(new)[0]] - emb[tok.encode(old)[0]])
    return LowRank(PARAM, u[:, None].float(), v[:, None].float())


def artifact_of(payloads: list, fingerprint: str, plan: Plan) -> Artifact:
    return build_artifact([("s00-rome", payloads)], base_model="tiny", base_fingerprint=fingerprint,
                          base_arch="LlamaForCausalLM", weight_layout="out_in",
                          plan_hash=plan.sha256)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for these tests: the machines are shared and small ops
    slow down badly when two threads fight other processes for two cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Setup:
    model: Any
    tok: ByteTokenizer
    fingerprint: str
    old: str
    new: str
    facts: Any


@pytest.fixture(scope="session")
def setup() -> Setup:
    model = wide_llama()
    tok = ByteTokenizer()
    with torch.no_grad():
        logits = model(torch.tensor([tok(PROMPT)["input_ids"]])).logits[0, -1]
    order = logits.argsort(descending=True).tolist()
    printable = [i for i in order if 33 <= (i - 1) % 256 < 127]
    old, new = tok.decode([printable[0]]), tok.decode([printable[-1]])
    fp = fingerprint_model(model)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fp)
    return Setup(model, tok, fp, old, new, facts)


def edited_copy(model: Any, artifact: Artifact, fingerprint: str) -> Any:
    from kmec.artifacts import apply

    edited = copy.deepcopy(model)
    apply(artifact, edited, fingerprint=fingerprint)
    return edited


# ---------------------------------------------------------------- builds for CLI tests

CLAIMS = (Claim(metric="efficacy", threshold=1.0),
          Claim(metric="locality", threshold=0.9, sample=30, kl=0.05))


@pytest.fixture()
def tiny_loader(setup, monkeypatch):
    """``load_model`` returns a copy of the tiny model, whatever the reference."""
    from kmec.models.load import LoadedModel, ModelRef

    def load(ref, **_):
        return LoadedModel(model=copy.deepcopy(setup.model), tok=setup.tok, facts=setup.facts,
                           ref=ModelRef(str(ref), "folder", None))

    monkeypatch.setattr("kmec.models.load.load_model", load)


def write_build(setup, tmp_path, payloads):
    """A build directory as kmec compile writes it, for the tiny model and ``payloads``."""
    from kmec.artifacts import save_artifact
    from kmec.hashing import canonical_json

    spec = make_spec(setup.old, setup.new, CLAIMS)
    plan = make_plan(spec, setup.fingerprint)
    build = tmp_path / "build"
    build.mkdir()
    (build / "plan.json").write_text(plan.to_json())
    (build / "spec.json").write_text(canonical_json(spec.model_dump(mode="json")))
    art = artifact_of(payloads, setup.fingerprint, plan)
    (build / "build.json").write_text(canonical_json({
        "spec_path": str(tmp_path / "spec.kmec"), "model": "tiny", "plan_hash": plan.sha256,
        "kmec_version": "0.1.0", "artifact_sha256": art.manifest.sha256}))
    save_artifact(art, build / "artifact")
    return build, art


def cli(*args) -> int:
    """Run the kmec CLI in-process; its exit code."""
    from kmec.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


@pytest.fixture(scope="module")
def good(setup):
    """A rank-one payload that makes the edit and leaves every checked prompt alone."""
    spec = make_spec(setup.old, setup.new, CLAIMS)
    avoid = checked_prompts(spec, make_plan(spec, setup.fingerprint))
    return targeted(setup.model, setup.tok, avoid, setup.new, setup.old)


def run_verify(setup, payloads, claims, *, edited=None, **kw):
    """Verify ``payloads`` (applied to a copy of the tiny model) against ``claims``."""
    from kmec.verify import verify

    spec = make_spec(setup.old, setup.new, claims)
    plan = make_plan(spec, setup.fingerprint)
    art = artifact_of(payloads, setup.fingerprint, plan)
    if edited is None:
        edited = edited_copy(setup.model, art, setup.fingerprint)
    return verify(spec, plan, setup.model, edited, setup.tok, seed=0, artifact=art, **kw)
