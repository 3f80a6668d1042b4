"""GRACE-style codebook (``memory``) on tiny models: GRACE's add / expand / split
rules, the edit takes, every other prompt keeps the base model's logits bit for
bit, revert is exact, the artifact round-trips, ``kmec apply`` folders load with
the memory installed, and sequential steps just add tables."""

from __future__ import annotations

import pytest
import torch

import kmec
import kmec.compile as kcompile
from kmec.artifacts import apply, build_artifact, load_artifact, save_artifact
from kmec.artifacts.edited import (
    load_edited,
    load_weights,
    read_record,
    revert_folder,
    write_edited,
)
from kmec.artifacts.memory import codebook_lookup, install_memory
from kmec.artifacts.payloads import MemoryTable
from kmec.backends import BACKENDS, get_backend
from kmec.backends.base import ExecContext
from kmec.backends.memory import Codebook, MemoryParams, exclude, grace_insert
from kmec.errors import ArtifactError
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.load import LoadedModel, ModelRef, fingerprint_model
from kmec.models.tokens import target_text
from kmec.planner import plan as make_plan
from kmec.planner.model import EditRequest, Step
from kmec.spec import MethodHint, PromptEdit, Spec
from tests.conftest import SpaceLetterTokenizer, build_tiny_model

LAYER = 2
# Tiny random models: a larger step size and no context prefixes keep this fast.
PARAMS = MemoryParams(lr=0.5, steps=80, n_prefixes=0).model_dump(mode="json")
EDITS = (
    EditRequest(name="bcc", prompt="The key of bcc", subject="bcc", target_new="Q",
                scope=("A key of bcc",)),
    EditRequest(name="lfx", prompt="The key of lfx", subject="lfx", target_new="R"),
)
# Subjects end in distinct letters and the other prompts hold neither: in a tiny random
# model a token's state is mostly the token itself, so a shared letter would share the key.
OTHERS = ("The key of zvj", "Hello world", "The door of itg", "bad and more")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: more threads only contend for the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(family: str = "llama") -> LoadedModel:
    model = build_tiny_model(family, seed=5)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fingerprint_model(model))
    return LoadedModel(model, SpaceLetterTokenizer(), facts, ModelRef("tiny", "hub", None))


def ctx_for(lm: LoadedModel) -> ExecContext:
    return ExecContext(model=lm.model, tok=lm.tok, adapter=adapter_for(lm.facts.model_type),
                       facts=lm.facts, seed=0)


def artifact_of(lm: LoadedModel, payloads, steps: str = "s01-memory"):
    return build_artifact([(steps, payloads)], base_model="tiny",
                          base_fingerprint=lm.facts.fingerprint, base_arch="x",
                          weight_layout=adapter_for(lm.facts.model_type).weight_layout,
                          plan_hash="h")


@torch.no_grad()
def logits(model, tok, prompt: str) -> torch.Tensor:
    return model(torch.tensor([tok.encode(prompt)])).logits[0]


def target_logprob(model, tok, edit: EditRequest) -> float:
    t = tok.encode(target_text(edit.prompt, edit.target_new))
    assert len(t) == 1
    return float(logits(model, tok, edit.prompt)[-1].log_softmax(-1)[t[0]])


# ---------------------------------------------------------------- GRACE rules (pure)


def test_grace_adds_expands_and_splits():
    b = Codebook()
    assert grace_insert(b, torch.tensor([10.0, 0.0]), "a", 0, 0.1) == "add"
    assert grace_insert(b, torch.tensor([10.5, 0.0]), "a", 1, 0.1) == "covered"
    assert grace_insert(b, torch.tensor([11.8, 0.0]), "a", 2, 0.1) == "expand"
    assert b.radius == [pytest.approx(1.8)] and b.members == [[0, 1, 2]]
    # a conflicting label inside the ball: both radii end at half the distance, no overlap
    assert grace_insert(b, torch.tensor([10.0, 1.2]), "b", 3, 0.1) == "split"
    d = 1.2
    assert b.radius[1] == pytest.approx(d / 2) and b.radius[0] < d / 2
    assert b.radius[0] + b.radius[1] < d
    # far away: a fresh entry with ε = init_radius · ‖k‖
    assert grace_insert(b, torch.tensor([0.0, 30.0]), "c", 4, 0.1) == "add"
    assert b.radius[2] == pytest.approx(3.0)


def test_exclude_shrinks_balls_that_hold_a_preserve_state():
    b = Codebook()
    grace_insert(b, torch.tensor([10.0, 0.0]), "a", 0, 0.3)  # radius 3
    keys = torch.tensor([[10.0, 0.0]])
    assert exclude(b, keys, torch.tensor([[50.0, 0.0]]), 0.9, 0.3) == []
    assert exclude(b, keys, torch.tensor([[12.0, 0.0]]), 0.9, 0.3) == [(0, pytest.approx(2.0))]
    assert b.radius == [pytest.approx(1.8)]
    fire, _ = codebook_lookup(torch.tensor([[12.0, 0.0], [11.0, 0.0]]), torch.stack(b.keys),
                              torch.tensor(b.radius))
    assert fire.tolist() == [False, True]


def test_lookup_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    keys, x = torch.randn(50, 16, generator=g), torch.randn(300, 16, generator=g)
    radius = torch.cdist(x, keys).min(0).values  # every key's radius touches some row exactly
    fire, idx = codebook_lookup(x, keys, radius)
    for i in range(0, 300, 37):
        f1, i1 = codebook_lookup(x[i:i + 1], keys, radius)
        assert f1.item() == fire[i].item() and i1.item() == idx[i].item()


# ---------------------------------------------------------------- on tiny models


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def compiled(request):
    lm = tiny_lm(request.param)
    before = fingerprint_model(lm.model)
    step = Step(id="s01-memory", backend="memory", edits=EDITS, layers=(LAYER,), params=PARAMS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payloads = list(get_backend("memory").execute(step, ctx_for(lm)))
    finally:
        torch.set_num_threads(threads)
    assert fingerprint_model(lm.model) == before  # execute never mutates the model
    return lm, payloads


def test_payload_is_one_codebook_table(compiled):
    lm, payloads = compiled
    (table,) = payloads
    assert isinstance(table, MemoryTable) and table.meta["kind"] == "codebook"
    assert table.site == adapter_for(lm.facts.model_type).site("mlp", LAYER)
    n = table.keys.shape[0]
    assert n >= 2 and table.values.shape == (n, lm.model.config.hidden_size)
    assert table.radius.shape == (n,) and bool((table.radius > 0).all())
    assert {"subject:bcc", "subject:lfx"} <= set(table.meta["labels"])


def test_edit_takes_others_bit_identical_revert_exact(compiled):
    lm, payloads = compiled
    model, tok = lm.model, lm.tok
    prompts = [e.prompt for e in EDITS] + ["A key of bcc", *OTHERS]
    base = {p: logits(model, tok, p) for p in prompts}
    base_lp = [target_logprob(model, tok, e) for e in EDITS]
    handle = apply(artifact_of(lm, payloads), model)
    try:
        for e, lp0 in zip(EDITS, base_lp):
            assert target_logprob(model, tok, e) > lp0 + 0.3
            top = int(logits(model, tok, e.prompt)[-1].argmax())
            assert tok.decode([top]) == target_text(e.prompt, e.target_new)
        for p in OTHERS:
            assert torch.equal(logits(model, tok, p), base[p]), p
    finally:
        handle.revert()
    for p in prompts:
        assert torch.equal(logits(model, tok, p), base[p]), p
    assert fingerprint_model(model) == lm.facts.fingerprint


def test_generate_with_kv_cache_emits_the_target(compiled):
    lm, payloads = compiled
    e = EDITS[0]
    ids = torch.tensor([lm.tok.encode(e.prompt)])
    handle = apply(artifact_of(lm, payloads), lm.model)
    try:
        out = lm.model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        handle.revert()
    assert lm.tok.decode(out[0, ids.shape[1]:ids.shape[1] + 1].tolist()) == " Q"


def test_artifact_round_trip(compiled, tmp_path):
    lm, payloads = compiled
    art = artifact_of(lm, payloads)
    loaded = load_artifact(save_artifact(art, tmp_path / "art"))
    (a,), (b,) = art.payloads(), loaded.payloads()
    assert isinstance(b, MemoryTable) and b.meta == a.meta and b.site == a.site
    for name in ("keys", "values", "radius"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert loaded.manifest == art.manifest
    outs = []
    for artifact in (art, loaded):
        h = apply(artifact, lm.model)
        try:
            outs.append([logits(lm.model, lm.tok, e.prompt) for e in EDITS])
        finally:
            h.revert()
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def saved_base(lm: LoadedModel, payloads, folder) -> object:
    """Save the tiny base model to ``folder``; the artifact for it (folder fingerprint)."""
    lm.model.save_pretrained(folder)
    model, _ = load_weights(str(folder))
    return build_artifact([("s01-memory", payloads)], base_model=str(folder),
                          base_fingerprint=fingerprint_model(model), base_arch="x",
                          weight_layout=adapter_for(lm.facts.model_type).weight_layout,
                          plan_hash="h")


def test_kmec_apply_folder_loads_with_the_memory(compiled, tmp_path):
    lm, payloads = compiled
    art = saved_base(lm, payloads, tmp_path / "base")
    written = write_edited(art, tmp_path / "edited")
    assert written.edited_fingerprint == written.base_fingerprint  # weights untouched
    assert (tmp_path / "edited" / "kmec_memory" / "manifest.json").exists()
    assert read_record(tmp_path / "edited").base_params == {}

    edited = kmec.load_model(str(tmp_path / "edited"))  # one call: weights + memory
    assert edited.memory is not None
    e = EDITS[0]
    assert target_logprob(edited.model, lm.tok, e) > target_logprob(lm.model, lm.tok, e) + 0.3
    for p in OTHERS:
        assert torch.equal(logits(edited.model, lm.tok, p), logits(lm.model, lm.tok, p))
    edited.memory.revert()
    assert torch.equal(logits(edited.model, lm.tok, e.prompt), logits(lm.model, lm.tok, e.prompt))

    revert_folder(tmp_path / "edited", tmp_path / "restored")  # weights without the memory
    assert not (tmp_path / "restored" / "kmec_memory").exists()
    plain = load_edited(tmp_path / "edited")
    assert plain.record is not None and plain.memory is not None


def test_a_tampered_memory_folder_is_refused(compiled, tmp_path):
    lm, payloads = compiled
    write_edited(saved_base(lm, payloads, tmp_path / "base"), tmp_path / "edited")
    other = MemoryTable(site=payloads[0].site, layer=LAYER, keys=payloads[0].keys,
                        values=payloads[0].values * 2, radius=payloads[0].radius,
                        meta=payloads[0].meta)
    save_artifact(artifact_of(lm, [other]), tmp_path / "edited" / "kmec_memory")
    with pytest.raises(ArtifactError, match="not the one"):
        load_edited(tmp_path / "edited")


def test_malformed_tables_are_refused():
    lm = tiny_lm()
    site = adapter_for("llama").site("mlp", LAYER)
    bad = MemoryTable(site=site, layer=LAYER, keys=torch.zeros(3, 32), values=torch.zeros(2, 32),
                      radius=torch.ones(3), meta={"kind": "codebook"})
    with pytest.raises(ArtifactError, match="expected"):
        install_memory(lm.model, bad)
    nowhere = MemoryTable(site="model.layers.9.mlp", layer=9, keys=torch.zeros(1, 32),
                          values=torch.zeros(1, 32), radius=torch.ones(1), meta={"kind": "codebook"})
    with pytest.raises(ArtifactError, match="no module"):
        apply(artifact_of(lm, [nowhere]), lm.model)
    unknown = MemoryTable(site=site, layer=LAYER, keys=torch.zeros(1, 32),
                          values=torch.zeros(1, 32), radius=torch.ones(1), meta={"kind": "x"})
    with pytest.raises(ArtifactError, match="unknown kind"):
        install_memory(lm.model, unknown)
    assert not lm.model.model.layers[LAYER].mlp._forward_hooks


# ---------------------------------------------------------------- through the planner


def test_weights_frozen_plans_and_compiles_a_sequence_of_tables(tmp_path, monkeypatch):
    """``weights frozen`` + ``order sequence``: one codebook table per edit; applied
    together, both edits take (tables at one MLP are searched together)."""
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    lm = tiny_lm()
    spec = Spec(order="sequence", method=MethodHint(frozen=True, layers=(LAYER,)),
                edits=tuple(PromptEdit(name=e.name, prompt=e.prompt, subject=e.subject,
                                       target=e.target_new) for e in EDITS))
    plan = make_plan(spec, lm.facts, backends=BACKENDS)
    assert [s.backend for s in plan.steps] == ["memory", "memory"]
    steps = tuple(s.model_copy(update={"params": {**s.params, **PARAMS}}) for s in plan.steps)
    plan = plan.model_copy(update={"steps": steps})
    art = kcompile.execute(plan, lm, use_cache=False)
    assert len(art.manifest.payloads) == 2 and fingerprint_model(lm.model) == lm.facts.fingerprint
    base_lp = [target_logprob(lm.model, lm.tok, e) for e in EDITS]
    h = apply(art, lm.model)
    try:
        assert len(h.hooks) == 2
        for e, lp0 in zip(EDITS, base_lp):
            assert target_logprob(lm.model, lm.tok, e) > lp0 + 0.3
    finally:
        h.revert()
    assert not lm.model.model.layers[LAYER].mlp._forward_hooks


def test_compiling_twice_gives_the_same_table():
    lm = tiny_lm()
    step = Step(id="s01-memory", backend="memory", edits=EDITS, layers=(LAYER,),
                params={**PARAMS, "n_prefixes": 2, "steps": 5})
    a, b = (get_backend("memory").execute(step, ctx_for(lm))[0] for _ in range(2))
    assert a.meta == b.meta
    for name in ("keys", "values", "radius"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_protected_neighbours_shrink_radii_like_preserve_prompts():
    """The step's protect prompts (listed neighbours of a locality claim) are negatives:
    the same radii as the same prompt declared as `preserve`."""
    lm = tiny_lm()
    near = "The key of bcd"  # shares all but its last letter with an edited subject
    params = {**PARAMS, "steps": 2, "init_radius": 2.0}
    runs = {}
    for name, edits, protect in (
            ("none", EDITS, ()),
            ("preserve", (EDITS[0].model_copy(update={"preserve": (near,)}), EDITS[1]), ()),
            ("protect", EDITS, (near,))):
        step = Step(id="s01-memory", backend="memory", edits=edits, layers=(LAYER,),
                    params=params, protect=protect)
        runs[name] = get_backend("memory").execute(step, ctx_for(lm))[0].radius
    assert torch.equal(runs["preserve"], runs["protect"])
    assert not torch.equal(runs["none"], runs["protect"])
