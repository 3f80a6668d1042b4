"""Retrieval memory on a tiny Llama with a tiny random sentence encoder: in-scope
rows are answered with the demonstration in front of them (exactly as the base
model would answer that text), every other row keeps the base model's logits
bit for bit, generation works left-padded, revert is exact, the threshold is
calibrated on the spec's prompts, and the artifact round-trips.

The real all-MiniLM-L6-v2 is exercised by the slow end-to-end test
(tests/backends/test_memory_e2e.py); here a random 2-layer BERT with a
character vocabulary stands in (saved to a folder, loaded like any embedder).
"""

from __future__ import annotations

import pytest
import torch

import kmec
from kmec.artifacts import apply, build_artifact, load_artifact, save_artifact
from kmec.artifacts.edited import load_weights, write_edited
from kmec.artifacts.memory import _SITES
from kmec.artifacts.payloads import MemoryTable
from kmec.artifacts.scope import embed, load_embedder_cached, segments
from kmec.backends import get_backend
from kmec.backends.base import ExecContext
from kmec.backends.retrieval import calibrate
from kmec.errors import BackendError, ModelError
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.load import LoadedModel, ModelRef, fingerprint_model
from kmec.planner.model import EditRequest, Step
from kmec.verify.decode import greedy_continuations
from tests.conftest import SpaceLetterTokenizer, build_tiny_model, make_tiny_embedder

TEMPLATE = "{prompt} {target}\n"
EDITS = (EditRequest(name="bcc", prompt="The key of bcc", subject="bcc", target_new="Q"),
         EditRequest(name="lfx", prompt="The key of lfx", subject="lfx", target_new="R"))
OTHERS = ("Hello world", "The door of itg", "The key of zvj")


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    return make_tiny_embedder(tmp_path_factory.mktemp("embedder"))


def tiny_lm() -> LoadedModel:
    model = build_tiny_model("llama", seed=5)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fingerprint_model(model))
    return LoadedModel(model, SpaceLetterTokenizer(), facts, ModelRef("tiny", "hub", None))


def compile_step(lm, embedder_dir, edits=EDITS, protect=(), **params):
    params = {"embedder": str(embedder_dir), "threshold": 0.995, "margin": 0.005,
              "template": TEMPLATE, **params}
    step = Step(id="s01-retrieval", backend="retrieval", edits=edits, params=params,
                protect=protect)
    ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter_for("llama"), facts=lm.facts)
    return list(get_backend("retrieval").execute(step, ctx))


def artifact_of(lm, payloads, base_model="tiny", fingerprint=None):
    return build_artifact([("s01-retrieval", payloads)], base_model=base_model,
                          base_fingerprint=fingerprint or lm.facts.fingerprint, base_arch="x",
                          weight_layout="out_in", plan_hash="h")


@pytest.fixture(scope="module")
def compiled(embedder_dir):
    lm = tiny_lm()
    payloads = compile_step(lm, embedder_dir)
    assert fingerprint_model(lm.model) == lm.facts.fingerprint
    return lm, payloads


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]


def demo_ids(tok, edit) -> list[int]:
    return tok.encode(TEMPLATE.format(prompt=edit.prompt, target=edit.target_new))


def expected(model, tok, ids: list[int]) -> tuple[torch.Tensor, list]:
    """What the memory must give for ``ids`` (memory installed on ``model``): at each
    position routed to an edit, the base model's logits with that edit's
    demonstration in front; elsewhere the base model's own. Also the routes."""
    routes = _SITES[model.model].classifier.route([ids])[0]
    site = _SITES[model.model]
    site.busy = True  # the hook passes through: the base model
    try:
        out = logits(model, ids).clone()
        for owner in {r for r in routes if r is not None}:
            d = demo_ids(tok, EDITS[owner[1]])
            ref = logits(model, d + ids)[len(d):]
            for t, r in enumerate(routes):
                if r == owner:
                    out[t] = ref[t]
    finally:
        site.busy = False
    return out, routes


# ---------------------------------------------------------------- pure parts


def test_segments_and_calibration():
    assert segments("Noise here! The key of bcc") == ["Noise here! The key of bcc",
                                                      "The key of bcc"]
    assert segments("  one line  ") == ["one line"]
    assert calibrate([], [], prior=0.65, margin=0.02) == 0.65
    assert calibrate([], [0.8], prior=0.65, margin=0.02) == pytest.approx(0.82)
    # not separable: the balanced-accuracy optimum, the higher cut on ties
    assert calibrate([0.7, 0.9], [0.8, 0.6], prior=0.65, margin=0.02) == 0.85


# ---------------------------------------------------------------- compile


def test_table_keeps_the_edits_as_text(compiled, embedder_dir):
    _, payloads = compiled
    (table,) = payloads
    assert isinstance(table, MemoryTable) and table.meta["kind"] == "retrieval"
    assert table.site == "model" and table.layer == -1
    assert table.values.tolist() == [0, 0, 1, 1]  # each prompt bare and completed
    assert torch.allclose(table.keys.norm(dim=-1), torch.ones(4))
    assert torch.allclose(table.radius, torch.full((4,), 1 - 0.995))
    assert [(e["prompt"], e["target"]) for e in table.meta["edits"]] == [
        (e.prompt, e.target_new) for e in EDITS]
    assert table.meta["embedder_fingerprint"] == load_embedder_cached(str(embedder_dir))[2]


def test_threshold_is_calibrated_on_scope_and_preserve(embedder_dir):
    lm = tiny_lm()
    m, t, _ = load_embedder_cached(str(embedder_dir))
    edit = EditRequest(name="bcc", prompt="The key of bcc", subject="bcc", target_new="Q",
                       scope=("A key of bcc",), preserve=("The door of itg",))
    (table,) = compile_step(lm, embedder_dir, edits=(edit,))
    keys = ["The key of bcc", "The key of bcc Q", "A key of bcc", "A key of bcc Q"]
    assert torch.allclose(table.keys, embed(m, t, keys))  # bare and completed with the target
    e = embed(m, t, [*keys, "The door of itg"])
    sims = e @ e.T
    pos = [float(sims[i, 2:4].max()) for i in (0, 1)] + [float(sims[i, 0:2].max()) for i in (2, 3)]
    neg = float(sims[4, :4].max())
    tau = table.meta["edits"][0]["threshold"]
    assert tau == calibrate(pos, [neg], 0.995, 0.005)
    assert neg + 0.005 <= tau <= min(pos)  # separable here: the preserve prompt stays out
    h = apply(artifact_of(lm, [table]), lm.model, tok=lm.tok)
    try:
        site = _SITES[lm.model.model]
        routes = site.classifier.route([lm.tok.encode(p) for p in
                                        ("A key of bcc", "The door of itg")])
    finally:
        h.revert()
    assert routes[0][-1] == (0, 0) and routes[1][-1] is None  # decisions at the last position


def test_no_tokenizer_or_bad_template_is_a_backend_error(embedder_dir):
    lm = tiny_lm()
    step = Step(id="s", backend="retrieval", edits=EDITS,
                params={"embedder": str(embedder_dir), "template": "no fields"})
    ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter_for("llama"), facts=lm.facts)
    with pytest.raises(BackendError, match="template"):
        get_backend("retrieval").execute(step, ctx)


# ---------------------------------------------------------------- at run time


def test_in_scope_sees_the_demo_others_bit_identical_revert_exact(compiled):
    lm, payloads = compiled
    model, tok = lm.model, lm.tok
    base = {p: logits(model, tok.encode(p)) for p in (*OTHERS, *(e.prompt for e in EDITS))}
    use_cache = model.generation_config.use_cache
    h = apply(artifact_of(lm, payloads), model, tok=tok)
    try:
        assert model.generation_config.use_cache is False
        for i, e in enumerate(EDITS):
            got = logits(model, tok.encode(e.prompt))
            want, routes = expected(model, tok, tok.encode(e.prompt))
            assert routes[-1] == (0, i)  # the whole prompt is in scope of its edit
            assert not torch.equal(got[-1], base[e.prompt][-1])
            assert torch.allclose(got, want, atol=1e-6)
            out = [t for t, r in enumerate(routes) if r is None]
            assert torch.equal(got[out], base[e.prompt][out])  # causal: earlier positions too
        for p in OTHERS:
            assert torch.equal(logits(model, tok.encode(p)), base[p]), p
    finally:
        h.revert()
    for p, ref in base.items():
        assert torch.equal(logits(model, tok.encode(p)), ref), p
    assert model.generation_config.use_cache == use_cache
    assert not model.model._forward_hooks


def test_mixed_right_padded_batch(compiled):
    """Out-of-scope rows of a batch with in-scope rows keep the base's batched logits."""
    lm, payloads = compiled
    model, tok = lm.model, lm.tok
    rows = [tok.encode(EDITS[0].prompt + " Q"), tok.encode("Hello world")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        h = apply(artifact_of(lm, payloads), model, tok=tok)
        try:
            got = model(input_ids=ids, attention_mask=mask).logits
            want, routes = expected(model, tok, rows[0])
        finally:
            h.revert()
    assert torch.equal(got[1], base[1])
    assert routes[-2] == (0, 0)  # the position that predicts the target reads the prompt only
    assert torch.allclose(got[0, :len(rows[0])], want, atol=1e-5)


def test_left_padded_generation(compiled):
    lm, payloads = compiled
    model, tok = lm.model, lm.tok
    prompts = [EDITS[1].prompt, "Hello world"]
    demo = TEMPLATE.format(prompt=EDITS[1].prompt, target="R")
    [(base_demo,)] = greedy_continuations([model], tok, [demo + EDITS[1].prompt], max_new_tokens=1)
    h = apply(artifact_of(lm, payloads), model, tok=tok)
    try:
        # the first new token is predicted from the prompt alone, which is in scope
        first = greedy_continuations([model], tok, prompts, max_new_tokens=1)
        edited = greedy_continuations([model], tok, prompts, max_new_tokens=4)
        with pytest.raises(ModelError, match="KV cache"):
            model.generate(input_ids=torch.tensor([tok.encode(prompts[0])]), max_new_tokens=3,
                           do_sample=False, use_cache=True, pad_token_id=0)
    finally:
        h.revert()
    base = greedy_continuations([model], tok, prompts, max_new_tokens=4)
    assert first[0] == (base_demo,) and edited[0][0].startswith(base_demo)
    assert edited[1] == base[1]


def test_apply_without_a_tokenizer_is_refused_and_leaves_nothing(compiled):
    lm, payloads = compiled
    use_cache = lm.model.generation_config.use_cache
    with pytest.raises(ModelError, match="tokenizer"):
        apply(artifact_of(lm, payloads), lm.model)
    assert not lm.model.model._forward_hooks
    assert lm.model.generation_config.use_cache == use_cache


def test_another_embedder_is_refused(compiled):
    lm, payloads = compiled
    t = payloads[0]
    other = MemoryTable(site=t.site, layer=t.layer, keys=t.keys, values=t.values,
                        radius=t.radius, meta={**t.meta, "embedder_fingerprint": "0" * 64})
    with pytest.raises(ModelError, match="fingerprint"):
        apply(artifact_of(lm, [other]), lm.model, tok=lm.tok)
    assert not lm.model.model._forward_hooks


def test_round_trip_and_edited_folder(compiled, tmp_path):
    lm, payloads = compiled
    art = artifact_of(lm, payloads)
    loaded = load_artifact(save_artifact(art, tmp_path / "art"))
    assert loaded.manifest == art.manifest
    (a,), (b,) = art.payloads(), loaded.payloads()
    assert b.meta == a.meta and all(torch.equal(getattr(a, n), getattr(b, n))
                                    for n in ("keys", "values", "radius"))

    lm.model.save_pretrained(tmp_path / "base")
    fp = fingerprint_model(load_weights(str(tmp_path / "base"))[0])
    write_edited(artifact_of(lm, payloads, str(tmp_path / "base"), fp), tmp_path / "edited")
    with pytest.raises(ModelError, match="tokenizer"):
        kmec.load_model(str(tmp_path / "edited"))  # the tiny folder has no tokenizer files
    edited = kmec.load_model(str(tmp_path / "edited"), tok=lm.tok)
    ids = lm.tok.encode(EDITS[0].prompt)
    want, routes = expected(edited.model, lm.tok, ids)
    assert routes[-1] == (0, 0)
    assert torch.allclose(logits(edited.model, ids), want, atol=1e-6)
    assert torch.equal(logits(edited.model, lm.tok.encode("Hello world")),
                       logits(lm.model, lm.tok.encode("Hello world")))


def test_the_planner_takes_retrieval_with_frozen_weights():
    from kmec.backends import BACKENDS
    from kmec.planner import plan as make_plan
    from kmec.spec import MethodHint, PromptEdit, Spec

    lm = tiny_lm()
    spec = Spec(method=MethodHint(method="retrieval", frozen=True, layers=(3,), max_delta=0.01),
                edits=tuple(PromptEdit(name=e.name, prompt=e.prompt, target=e.target_new)
                            for e in EDITS))
    p = make_plan(spec, lm.facts, backends=BACKENDS)
    (step,) = p.steps
    reasons = " | ".join(f"{r.choice}: {r.because}" for r in step.reasons)
    assert step.backend == "retrieval" and step.layers == () and step.needs_stats is None
    assert "no layers: the retrieval memory reads the input text" in reasons
    assert "`layers` do not apply" in reasons
    assert "max_delta=0.01 holds trivially: retrieval changes no weights" in reasons
    assert "embedding 4 texts" in reasons and step.cost.peak_mb > 0
    assert step.params["threshold"] == 0.65


def test_protected_neighbours_calibrate_the_threshold_like_preserve_prompts(embedder_dir):
    """The step's protect prompts (listed neighbours of a locality claim) are negatives too."""
    lm = tiny_lm()
    declared = EditRequest(name="bcc", prompt="The key of bcc", subject="bcc", target_new="Q",
                           scope=("A key of bcc",), preserve=("The door of itg",))
    bare = declared.model_copy(update={"preserve": ()})
    (with_preserve,) = compile_step(lm, embedder_dir, edits=(declared,))
    (with_protect,) = compile_step(lm, embedder_dir, edits=(bare,), protect=("The door of itg",))
    (without,) = compile_step(lm, embedder_dir, edits=(bare,))
    assert with_preserve.meta["edits"][0]["threshold"] == with_protect.meta["edits"][0]["threshold"]
    assert "1 preserve" in with_protect.meta["edits"][0]["calibration"]
    assert "0 preserve" in without.meta["edits"][0]["calibration"]
