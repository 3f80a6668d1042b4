"""Artifacts: apply → revert is bit-exact on every family (in memory and via
edited folders), non-finite payloads and weights are refused, other format
versions get a clear message, and nothing is ever unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from kmec.artifacts import (
    MANIFEST,
    apply,
    audit,
    copy_for,
    load_artifact,
    save_artifact,
)
from kmec.artifacts.edited import (
    BASE_PARAMS,
    EDIT_RECORD,
    load_weights,
    read_base_params,
    read_record,
    revert_folder,
    write_edited,
)
from kmec.artifacts.payloads import Dense, LowRank, MemoryTable
from kmec.errors import ArtifactError
from kmec.models.load import fingerprint_model
from tests.conftest import (
    artifact_for,
    assert_identical,
    build_tiny_model,
    mlp_out_param,
    rank_one,
    snapshot,
)

# ---------------------------------------------------------------- apply / revert


def test_apply_revert_is_bit_exact_in_memory(tiny_family):
    model = build_tiny_model(tiny_family, seed=2)
    before = snapshot(model)
    # two payloads on one parameter plus a dense one elsewhere
    p2 = mlp_out_param(model, 2)
    dense = Dense(p2, torch.randn_like(model.get_parameter(p2)) * 1e-2)
    art = artifact_for(model, [rank_one(model), rank_one(model, seed=1), dense])
    handle = apply(art, model)
    assert not torch.equal(model.get_parameter(mlp_out_param(model)), before[mlp_out_param(model)])
    assert audit(build_tiny_model(tiny_family, seed=2), model, art).ok
    handle.revert()
    assert_identical(model, before)


def test_copy_for_shares_what_the_artifact_does_not_write(tiny_family):
    """The verifier's edited model: the written parameters are copies, the rest is the
    base's own tensors; applying to it edits it as a whole copy would and leaves the
    base bit for bit."""
    import copy

    model = build_tiny_model(tiny_family, seed=2)
    before = snapshot(model)
    written = mlp_out_param(model)
    art = artifact_for(model, [rank_one(model)])
    edited = copy_for(model, art)
    apply(art, edited)
    whole = copy.deepcopy(model)
    apply(art, whole)
    assert_identical(model, before)
    for name, p in edited.named_parameters():
        assert (p.data_ptr() == model.get_parameter(name).data_ptr()) == (name != written), name
        assert torch.equal(p, whole.get_parameter(name))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(edited(ids).logits, whole(ids).logits)


def test_apply_revert_via_folders_is_bit_exact(tiny_family, tmp_path):
    base = build_tiny_model(tiny_family, seed=4)
    base.save_pretrained(tmp_path / "base")
    art = artifact_for(base, [rank_one(base, layer=0), rank_one(base, layer=3)])
    written = write_edited(art, tmp_path / "edited", model=str(tmp_path / "base"))
    assert written.base_fingerprint == art.manifest.base_fingerprint
    assert written.tokenizer == "none"  # tiny folders have no tokenizer files
    record = read_record(tmp_path / "edited")
    assert sorted(record.base_params) == list(art.manifest.params) == list(written.params)
    originals = read_base_params(tmp_path / "edited", record)
    for name, t in originals.items():  # only the edited matrices, exactly as they were
        assert torch.equal(t, base.get_parameter(name))

    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    assert fingerprint_model(edited) == written.edited_fingerprint
    assert audit(base, edited, art).ok
    reverted = revert_folder(tmp_path / "edited", tmp_path / "reverted")
    assert reverted.base_fingerprint == art.manifest.base_fingerprint
    assert not (tmp_path / "reverted" / EDIT_RECORD).exists()
    assert not (tmp_path / "reverted" / BASE_PARAMS).exists()
    assert_identical(AutoModelForCausalLM.from_pretrained(tmp_path / "reverted"), snapshot(base))


def test_fingerprint_mismatch_is_refused_naming_both(tiny_models):
    model = tiny_models["llama"]
    art = artifact_for(model, [rank_one(model)], fingerprint="ab" * 32)
    before = snapshot(model)
    with pytest.raises(ArtifactError) as e:
        apply(art, model)
    msg = str(e.value)
    assert "abababababab" in msg and fingerprint_model(model)[:12] in msg
    assert "recompile" in msg
    assert_identical(model, before)


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("bad", ["nan_u", "inf_v", "nan_scale", "inf_dense"])
def test_apply_refuses_non_finite_payloads(tiny_models, bad):
    model = tiny_models["gpt2"]
    good = rank_one(model)
    payload = {
        "nan_u": LowRank(good.param, good.u.clone().index_fill_(0, torch.tensor([3]), float("nan")),
                         good.v),
        "inf_v": LowRank(good.param, good.u, good.v.clone().fill_(float("inf"))),
        "nan_scale": LowRank(good.param, good.u, good.v, float("nan")),
        "inf_dense": Dense(good.param, torch.full_like(model.get_parameter(good.param),
                                                       float("-inf"))),
    }[bad]
    art = artifact_for(model, [rank_one(model, layer=0), payload])
    before = snapshot(model)
    with pytest.raises(ArtifactError, match=r"payload p0001 \(step s01-hand, "
                       r"transformer\.h\.1\.mlp\.c_proj\.weight\) holds non-finite values"):
        apply(art, model)
    assert_identical(model, before)  # nothing was touched, not even the good payload


def test_apply_refuses_a_delta_that_overflows_the_dtype():
    model = build_tiny_model("llama").half()
    before = snapshot(model)
    art = artifact_for(model, [rank_one(model, layer=0), rank_one(model, scale=1e6)])
    with pytest.raises(ArtifactError, match="non-finite in torch.float16 .overflow."):
        apply(art, model)
    assert_identical(model, before)  # the first payload was rolled back


def test_audit_fails_on_nan_naming_the_parameter(tiny_models):
    base = tiny_models["gpt_neox"]
    edited = build_tiny_model("gpt_neox")
    art = artifact_for(base, [rank_one(base)])
    name = mlp_out_param(base)
    apply(art, edited)
    assert audit(base, edited, art).ok
    with torch.no_grad():
        edited.get_parameter(name)[0, 0] = float("nan")
    result = audit(base, edited, art)
    assert not result.ok and result.nonfinite == (name,)
    assert result.summary() == f"audit failed: non-finite values (NaN or inf) in: {name}"
    assert result.max_error == result.max_error  # not NaN: reports stay valid JSON


def test_audit_fails_on_nan_in_an_undeclared_parameter(tiny_models):
    base = tiny_models["gptj"]
    edited = build_tiny_model("gptj")
    with torch.no_grad():
        edited.get_parameter("transformer.h.0.attn.q_proj.weight")[1, 1] = float("inf")
    result = audit(base, edited, artifact_for(base, []))
    assert not result.ok and result.undeclared == ("transformer.h.0.attn.q_proj.weight",)


# ---------------------------------------------------------------- loading


def saved(tmp_path, model=None):
    model = model or build_tiny_model("gpt2")
    art = artifact_for(model, [rank_one(model)])
    return save_artifact(art, tmp_path / "art"), art


def test_load_round_trip_and_build_dir(tmp_path):
    path, art = saved(tmp_path)
    loaded = load_artifact(path)
    assert loaded.manifest == art.manifest
    assert all(torch.equal(loaded.tensors[k], v) for k, v in art.tensors.items())
    (tmp_path / "build").mkdir()
    path.rename(tmp_path / "build" / "artifact")
    assert load_artifact(tmp_path / "build").manifest == art.manifest


def test_load_other_format_version_is_explained(tmp_path):
    path, _ = saved(tmp_path)
    raw = json.loads((path / MANIFEST).read_text())
    raw.update(format="kmec-artifact/9", kmec_version="9.0.0", new_field=1)
    (path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    assert str(e.value) == (
        f"{path / MANIFEST} was written in format 'kmec-artifact/9' (by kmec 9.0.0); this kmec "
        "(0.1.0) reads 'kmec-artifact/2'\n"
        "  hint: use kmec 9.0.0 to read it, or recompile the spec with this kmec")


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("no_manifest", r"is not a kmec artifact \(no manifest.json\)"),
    ("not_json", "is not valid JSON"),
    ("not_object", r"is not a kmec-artifact record \(not a JSON object\)"),
    ("foreign", "has format 'x'; this kmec reads 'kmec-artifact/2'"),
    ("bad_field", "is not a valid manifest: weight_layout"),
    ("no_tensors", "cannot read"),
    ("tampered", "tensor p0000.u in .* does not match its recorded sha256"),
])
def test_load_damaged_artifacts(tmp_path, damage, message):
    path, _ = saved(tmp_path)
    m, t = path / MANIFEST, path / "payloads.safetensors"
    raw = json.loads(m.read_text())
    if damage == "missing":
        path = tmp_path / "nope"
    elif damage == "no_manifest":
        m.unlink()
    elif damage == "not_json":
        m.write_text("{")
    elif damage == "not_object":
        m.write_text("[]")
    elif damage in ("foreign", "bad_field"):
        raw.update({"format": "x"} if damage == "foreign" else {"weight_layout": "diagonal"})
        m.write_text(json.dumps(raw))
    elif damage == "no_tensors":
        t.unlink()
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(t)
        tensors["p0000.u"][0] += 1
        save_file(tensors, t, metadata={"format": "kmec-artifact/2"})
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    base = build_tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    path, art = saved(tmp_path, base)
    write_edited(art, tmp_path / "edited", model=str(tmp_path / "base"))

    def no_pickle(*_a, **_k):
        raise AssertionError("kmec must not unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(target, name, no_pickle)
    assert load_artifact(path).manifest == art.manifest
    record = read_record(tmp_path / "edited")
    assert read_base_params(tmp_path / "edited", record).keys() == set(art.manifest.params)
    revert_folder(tmp_path / "edited", tmp_path / "reverted")


# ---------------------------------------------------------------- edited folders


def test_memory_payloads_are_saved_next_to_unchanged_weights(tmp_path):
    """External memories are hooks: the folder keeps the base weights and the tables
    (kmec_memory/); tests/backends/test_memory.py loads such folders back."""
    model = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    mem = MemoryTable("model.layers.1.mlp", 1, torch.zeros(2, 32), torch.zeros(2, 32),
                      torch.ones(2), {"kind": "codebook"})
    base, _ = load_weights(str(tmp_path / "base"))
    art = artifact_for(base, [mem], base_model=str(tmp_path / "base"))
    written = write_edited(art, tmp_path / "out", model=str(tmp_path / "base"))
    assert written.params == () and written.edited_fingerprint == written.base_fingerprint
    assert load_artifact(tmp_path / "out" / "kmec_memory").manifest.payloads == art.manifest.payloads


def test_out_must_not_be_the_base_folder(tmp_path):
    model = build_tiny_model("gpt2")
    model.save_pretrained(tmp_path / "base")
    art = artifact_for(model, [rank_one(model)])
    with pytest.raises(ArtifactError, match="is the base model's own folder"):
        write_edited(art, tmp_path / "base", model=str(tmp_path / "base"))


@pytest.mark.slow
def test_real_model_apply_and_revert_exactly(real_model, tmp_path):
    model = real_model.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if ".mlp.down_proj." in n}
    name = mlp_out_param(model, 12)
    assert name == "model.layers.12.mlp.down_proj.weight"
    art = artifact_for(model, [rank_one(model, layer=12, scale=1e-3)],
                       fingerprint=real_model.facts.fingerprint, base_model="smollm2-135m")
    handle = apply(art, model)
    assert not torch.equal(model.get_parameter(name), before[name])
    handle.revert()
    assert all(torch.equal(model.get_parameter(n), t) for n, t in before.items())
    assert fingerprint_model(model) == real_model.facts.fingerprint

    written = write_edited(art, tmp_path / "edited")  # base from the manifest: the alias
    assert written.tokenizer == "copied" and written.params == (name,)
    assert (tmp_path / "edited" / BASE_PARAMS).stat().st_size < 4 * 576 * 1536 + 4096
    revert_folder(tmp_path / "edited", tmp_path / "reverted")
    from kmec.models.load import load_model

    lm = load_model(str(tmp_path / "reverted"))  # tokenizer included
    assert fingerprint_model(lm.model) == real_model.facts.fingerprint
