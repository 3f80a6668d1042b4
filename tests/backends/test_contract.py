"""Every registered backend keeps the backend contract, on a tiny model.

For each backend in ``BACKENDS``: ``execute`` leaves the model bit-identical,
gives the same bytes when run again (determinism), its payloads are the ones
recorded in ``fixtures/golden_payloads.safetensors`` (regenerate with
``KMEC_UPDATE_GOLDEN=1`` only when a change is meant to change the numbers, and
with ``-n 0``: the workers would race on the file), the artifact survives a
save/load round trip, and apply → revert restores every parameter bit for bit.

The recorded payloads are compared within ``GOLDEN_RTOL`` (relative Frobenius
error per tensor), not by hash: the same code gives other last bits on another
CPU (measured 2026-12-03: AVX-512 against AVX2 kernels, via
``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``, moved the tiny
payloads by at most 9e-5 relative, ROME's v), while a change of method or
setting moves them by percents. Bit-for-bit determinism is checked on the
machine the test runs on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kmec.artifacts import apply, build_artifact, load_artifact, save_artifact
from kmec.backends import BACKENDS
from kmec.backends.base import ExecContext
from kmec.hashing import atomic_write_text, canonical_json, sha256_tensor
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.load import fingerprint_model
from kmec.planner.model import EditRequest, Step
from tests.conftest import (
    CorpusStats,
    SpaceLetterTokenizer,
    assert_identical,
    build_tiny_model,
    make_tiny_embedder,
    snapshot,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden_payloads.json"  # params per entry
GOLDEN_TENSORS = GOLDEN.with_suffix(".safetensors")  # "<entry>/<tensor>"
GOLDEN_RTOL = 1e-3
UPDATE = os.environ.get("KMEC_UPDATE_GOLDEN") == "1"
EDITS = (EditRequest(name="e1", prompt="Key of abc", subject="abc", target_new="Q",
                     scope=("abc key",), preserve=("Key of xyz",)),
         EditRequest(name="e2", prompt="Key of mno", subject="mno", target_new="R",
                     scope=("mno key",), preserve=("Door of xyz",)))
# small but real settings: the defaults' structure, fewer optimisation steps
PARAMS = {
    "rome": {"value": {"steps": 12}},
    "memit": {"value": {"steps": 12}},
    "alphaedit": {"value": {"steps": 12}, "null_space_rel": 0.3},  # random tiny C is full rank
    "ft": {"steps": 12},
    "memory": {},
    "retrieval": {"threshold": 0.995, "margin": 0.005, "template": "{prompt} {target}\n"},
    "mend": {},
}
LAYERS = {"rome": (1,), "memit": (1, 2), "alphaedit": (1, 2), "ft": (1, 2), "memory": (1,),
          "retrieval": (), "mend": (1, 2, 3)}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A KMEC_HOME of its own (the MEND editor is trained into it), and one torch thread:
    MEND's training sums gradients in a thread-dependent order (noted in BENCHMARKS.md),
    and tiny matrices gain nothing from a second thread on a shared machine."""
    path = tmp_path_factory.mktemp("contract-home")
    old, threads = os.environ.get("KMEC_HOME"), torch.get_num_threads()
    os.environ["KMEC_HOME"] = str(path)
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("KMEC_HOME", None)
    else:
        os.environ["KMEC_HOME"] = old


def _lm():
    model = build_tiny_model("llama", seed=3)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fingerprint_model(model))
    return model, SpaceLetterTokenizer(), facts


def _mend_editor(model, tok, facts) -> str:
    from kmec.backends.mend import DataInfo, EditorConfig, EditRecord, TrainConfig, train_editor

    words = ("bcc", "lfx", "zvj", "itg", "tbs", "vfn", "qrd", "mkp", "wha", "yoe", "gul", "dsi")
    recs = [EditRecord(prompt=f"The key of {w} is", target=chr(65 + i), rephrase=f"{w} has key",
                       loc=f"The door of {words[(i + 5) % 12]} is") for i, w in enumerate(words)]
    config = TrainConfig(steps=8, batch=4, lr=3e-3, log_every=4, checkpoint_every=4, max_len=48,
                         text_pool=16, editor=EditorConfig(rank=16))
    data = DataInfo(path="records", sha256="0" * 64, dataset="zsre", records=12, train=12,
                    held_out=0)
    return train_editor(model, tok, facts, recs, layers=LAYERS["mend"], config=config,
                        data=data).manifest.sha256


def _step(name: str, facts, extra: dict) -> Step:
    backend = BACKENDS[name]
    params = backend.default_params(facts).model_dump(mode="json")
    for key, value in {**PARAMS[name], **extra}.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) and \
            isinstance(params.get(key), dict) else value
    adapter = adapter_for(facts.model_type)
    writes = tuple(f"{adapter.site('mlp_out', layer)}.weight" for layer in LAYERS[name]) \
        if name not in ("memory", "retrieval") else ()
    return Step(id=f"s00-{name}", backend=name, edits=EDITS, layers=LAYERS[name],
                writes=writes, params=params)


def _recorded() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def _golden_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN_TENSORS)) if GOLDEN_TENSORS.exists() else {}


def _hashes(payloads: list) -> list[dict[str, str]]:
    return [{k: sha256_tensor(v) for k, v in vars(p).items() if isinstance(v, torch.Tensor)}
            for p in payloads]


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got.double() - ref.double()).norm()
    return float(diff / ref.double().norm().clamp_min(1e-30)) if diff > 0 else 0.0


def check_golden(entry: str, tensors: dict[str, torch.Tensor], params: dict | None = None) -> None:
    """``tensors`` (and ``params``) are the ones recorded under ``entry``, the tensors
    within :data:`GOLDEN_RTOL` (see the module docstring); records them with
    ``KMEC_UPDATE_GOLDEN=1``."""
    recorded, stored = _recorded(), _golden_tensors()
    if UPDATE:
        recorded[entry] = {"params": params, "tensors": sorted(tensors)}
        stored = {k: v for k, v in stored.items() if not k.startswith(f"{entry}/")}
        stored.update({f"{entry}/{k}": v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write_text(GOLDEN, canonical_json(recorded))
        from safetensors.torch import save_file

        tmp = GOLDEN_TENSORS.with_suffix(".tmp")
        save_file(dict(sorted(stored.items())), str(tmp))
        os.replace(tmp, GOLDEN_TENSORS)
    assert entry in recorded, f"no golden payloads for {entry}: run with KMEC_UPDATE_GOLDEN=1"
    assert recorded[entry] == {"params": params, "tensors": sorted(tensors)}, (
        f"{entry}'s payloads changed shape; if intended, regenerate with KMEC_UPDATE_GOLDEN=1")
    for name, got in sorted(tensors.items()):
        ref = stored[f"{entry}/{name}"]
        assert got.shape == ref.shape and got.dtype == ref.dtype, (entry, name)
        if not got.is_floating_point():
            assert torch.equal(got.cpu(), ref), f"{entry}/{name} changed"
            continue
        err = _rel_error(got, ref)
        assert err <= GOLDEN_RTOL, (
            f"{entry}/{name} moved by {err:.2e} (relative) from the recorded payload; "
            "if intended, regenerate with KMEC_UPDATE_GOLDEN=1")


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_contract(name, home, tmp_path_factory):
    model, tok, facts = _lm()
    extra: dict = {}
    if name == "retrieval":
        extra["embedder"] = str(make_tiny_embedder(tmp_path_factory.mktemp("embedder")))
    if name == "mend":
        extra["editor"] = _mend_editor(model, tok, facts)
    step = _step(name, facts, extra)
    adapter = adapter_for(facts.model_type)
    stats = CorpusStats(model, adapter, step.layers) if step.layers else None
    before = snapshot(model)
    ctx = ExecContext(model=model, tok=tok, adapter=adapter, facts=facts, stats=stats, seed=0)
    payloads = list(BACKENDS[name].execute(step, ctx))
    assert_identical(model, before)  # execute never changes the model

    art = build_artifact([(step.id, payloads)], base_model="tiny",
                         base_fingerprint=facts.fingerprint, base_arch=facts.arch,
                         weight_layout=adapter.weight_layout, plan_hash="h" * 64)
    params = {e.id: e.param or e.site for e in art.manifest.payloads}
    check_golden(name, art.tensors, params)
    again = list(BACKENDS[name].execute(step, ExecContext(
        model=model, tok=tok, adapter=adapter, facts=facts, stats=stats, seed=0)))
    assert _hashes(again) == _hashes(payloads), f"{name} is not deterministic"

    folder = tmp_path_factory.mktemp(f"art-{name}")
    save_artifact(art, folder / "artifact")
    loaded = load_artifact(folder / "artifact")
    assert loaded.manifest == art.manifest
    assert all(torch.equal(loaded.tensors[k], v) for k, v in art.tensors.items())

    handle = apply(loaded, model, tok=tok)
    with torch.no_grad():
        edited_logits = model(torch.tensor([tok.encode(EDITS[0].prompt)])).logits
    handle.revert()
    assert_identical(model, before)
    with torch.no_grad():
        base_logits = model(torch.tensor([tok.encode(EDITS[0].prompt)])).logits
    assert not torch.equal(edited_logits, base_logits), f"{name}'s edit changed nothing"


@pytest.mark.parametrize("name", ["rome", "memit", "alphaedit"])
def test_nothing_declared_gives_the_papers_edit(name, home):
    """With no scope prompts and no protected prompts the rank-one backends compute exactly
    what they did before declared prompts entered the edit (#10): the golden entry
    ``<name>:undeclared`` holds those payloads (first recorded before that change, as
    hashes; since then re-recorded only where the δ loop changed its rounding, by at most
    1e-6, see tests/models/test_replay.py and tests/models/test_prefix_kv.py, and for
    lr 1.0). ROME draws wordings of its own for such an edit by default
    (``value.wordings = 3``, tests/backends/test_wordings.py); with 0 it is the paper's."""
    model, tok, facts = _lm()
    bare = tuple(e.model_copy(update={"scope": ()}) for e in EDITS)
    off = {"value": {**PARAMS[name]["value"], "wordings": 0}}
    step = _step(name, facts, off).model_copy(update={"edits": bare})
    adapter = adapter_for(facts.model_type)
    ctx = ExecContext(model=model, tok=tok, adapter=adapter, facts=facts,
                      stats=CorpusStats(model, adapter, step.layers), seed=0)
    payloads = list(BACKENDS[name].execute(step, ctx))
    art = build_artifact([(step.id, payloads)], base_model="tiny",
                         base_fingerprint=facts.fingerprint, base_arch=facts.arch,
                         weight_layout=adapter.weight_layout, plan_hash="h" * 64)
    check_golden(f"{name}:undeclared", art.tensors)


def test_declared_scope_prompts_reach_the_edit(home):
    """A declared scope prompt moves the rank-one edit: the payloads differ from the
    undeclared edit's, and the scope prompt's target probability rises more."""
    model, tok, facts = _lm()
    adapter = adapter_for(facts.model_type)
    probs = {}
    for label, edits in (("declared", EDITS),
                         ("bare", tuple(e.model_copy(update={"scope": ()}) for e in EDITS))):
        step = _step("rome", facts, {"value": {"steps": 30}}).model_copy(update={"edits": edits})
        ctx = ExecContext(model=model, tok=tok, adapter=adapter, facts=facts,
                          stats=CorpusStats(model, adapter, step.layers), seed=0)
        art = build_artifact([(step.id, list(BACKENDS["rome"].execute(step, ctx)))],
                             base_model="tiny", base_fingerprint=facts.fingerprint,
                             base_arch=facts.arch, weight_layout=adapter.weight_layout,
                             plan_hash="h" * 64)
        handle = apply(art, model)
        with torch.no_grad():
            ids = tok.encode(EDITS[0].scope[0] + " Q")
            logits = model(torch.tensor([ids[:-1]])).logits[0, -1]
            probs[label] = float(logits.softmax(-1)[ids[-1]])
        handle.revert()
    assert probs["declared"] > probs["bare"], probs


def test_a_scope_prompt_the_subject_opens_becomes_an_edit_keyed_after_the_subject(home):
    """"Q key": the subject's last token is the prompt's first (the model's attention sink),
    so MEMIT keys that scope prompt at the next token, as one more column of its solve;
    ``opening_scope = "subject"`` keeps the old keying (one column per edit)."""
    from kmec.backends.keys import key_opening_scopes

    model, tok, facts = _lm()
    edits = (EditRequest(name="q", prompt="Key of Q", subject="Q", target_new="R",
                         scope=("Q key", "Key of Q again")),)
    moved = key_opening_scopes(tok, edits)
    assert [(e.name, e.prompt, e.subject, e.scope) for e in moved] == [
        ("q", "Key of Q", "Q", ("Key of Q again",)), ("q~opening1", "Q key", "Q ", ())]
    assert key_opening_scopes(tok, EDITS) == list(EDITS)  # "abc key": "c" is the 3rd token
    adapter = adapter_for(facts.model_type)
    ranks = {}
    for mode in ("next", "subject"):
        step = _step("memit", facts, {"opening_scope": mode}).model_copy(update={"edits": edits})
        ctx = ExecContext(model=model, tok=tok, adapter=adapter, facts=facts,
                          stats=CorpusStats(model, adapter, step.layers), seed=0)
        payloads = list(BACKENDS["memit"].execute(step, ctx))
        ranks[mode] = payloads[0].u.shape[1]
    assert ranks == {"next": 2, "subject": 1}


def test_fit_weight_changes_only_the_weighted_edits_share(home):
    """MEMIT's ``fit_weight`` (the repair rung "weigh"): weighting one edit changes the
    solve, and weight 1 for every edit is the unweighted solve exactly."""
    model, tok, facts = _lm()
    adapter = adapter_for(facts.model_type)
    out = {}
    for label, weights in (("none", {}), ("ones", {"e1": 1.0, "e2": 1.0}), ("e1", {"e1": 4.0})):
        step = _step("memit", facts, {"fit_weight": weights})
        ctx = ExecContext(model=model, tok=tok, adapter=adapter, facts=facts,
                          stats=CorpusStats(model, adapter, step.layers), seed=0)
        out[label] = [p.u @ p.v.T for p in BACKENDS["memit"].execute(step, ctx)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out["none"], out["ones"]))
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out["none"], out["e1"]))
