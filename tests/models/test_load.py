"""Model references: resolution, errors, cache, fingerprints, loading."""

from __future__ import annotations

import json
import time

import pytest
import torch

from kmec.errors import ModelError
from kmec.models import load as L
from tests.conftest import build_tiny_model


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_unknown_alias_suggests_close_name(home):
    with pytest.raises(ModelError) as e:
        L.resolve_ref("smollm2-13m")
    assert "unknown model 'smollm2-13m'" in str(e.value)
    assert "did you mean 'smollm2-135m'?" in str(e.value)


def test_alias_not_installed_names_the_install_command(home):
    with pytest.raises(ModelError) as e:
        L.resolve_ref("smollm2-135m")
    assert "model 'smollm2-135m' is not installed" in str(e.value)
    assert "kmec model install smollm2-135m" in str(e.value)


def test_missing_folder(home, tmp_path):
    with pytest.raises(ModelError) as e:
        L.resolve_ref(str(tmp_path / "no-such-model"))
    assert "does not exist" in str(e.value)


def test_folder_without_config(home, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as e:
        L.resolve_ref(str(tmp_path / "empty"))
    assert "not a Hugging Face model folder (no config.json)" in str(e.value)


def test_offline_hub_id_gives_clear_error(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    ref = L.resolve_ref("someorg/some-model")
    assert ref.kind == "hub"
    t = time.time()
    with pytest.raises(ModelError) as e:
        L.load_model(ref)
    assert "the Hugging Face hub is not reachable" in str(e.value)
    assert "pass its folder" in str(e.value)
    assert time.time() - t < 30


def test_corrupt_cache_entry(home):
    d = L.alias_dir("smollm2-135m")
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"truncated")
    (d / L.MODEL_META).write_text(json.dumps({"fingerprint": "x", "files": {"model.safetensors": 999}}))
    with pytest.raises(ModelError) as e:
        L.resolve_ref("smollm2-135m")
    assert "is corrupt" in str(e.value)
    assert "kmec model install --force smollm2-135m" in str(e.value)


def test_empty_reference(home):
    with pytest.raises(ModelError, match="empty model reference"):
        L.resolve_ref("  ")


def test_folder_roundtrip_and_fingerprint_cache(home, tmp_path):
    model = build_tiny_model("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    fp_mem = L.fingerprint_model(model)
    assert L.fingerprint_folder(folder) == fp_mem
    assert L.fingerprint_folder(folder) == fp_mem  # cached
    assert list((home / "fingerprints").glob("*.txt"))
    # a changed weight changes the fingerprint
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert L.fingerprint_model(model) != fp_mem


def test_fingerprint_ignores_tied_duplicate(tiny_models):
    fp1 = L.fingerprint_model(tiny_models["gpt2"])
    fp2 = L.fingerprint_model(tiny_models["gpt2"])
    assert fp1 == fp2 and len(fp1) == 64


def test_kmec_home_default(monkeypatch, tmp_path):
    monkeypatch.delenv("KMEC_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert L.kmec_home() == tmp_path / ".cache" / "kmec"


@pytest.mark.slow
def test_real_model_knows_paris(real_model):
    ids = real_model.tok("The capital of France is", return_tensors="pt")
    out = real_model.model.generate(**ids, max_new_tokens=5, do_sample=False,
                                    pad_token_id=real_model.tok.pad_token_id)
    text = real_model.tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text
    f = real_model.facts
    assert (f.arch, f.n_layers, f.d_model, f.d_mlp) == ("LlamaForCausalLM", 30, 576, 1536)
    assert f.tied_embeddings and len(f.fingerprint) == 64


@pytest.mark.slow
def test_minilm_alias_embeds():
    L.install_alias("minilm")
    model, tok = L.load_embedder("minilm")
    batch = tok(["a cat", "a kitten", "tax law"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1)
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert (e[0] @ e[1]) > (e[0] @ e[2])


def test_load_model_refuses_embedder_alias(home, monkeypatch):
    d = L.alias_dir("minilm")
    d.mkdir(parents=True)
    (d / L.MODEL_META).write_text(json.dumps({"fingerprint": "x", "files": {}}))
    with pytest.raises(ModelError, match="embedding model"):
        L.load_model("minilm")
