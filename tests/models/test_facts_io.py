"""``facts_for_ref``: model facts from config and metadata, equal to a loaded model's facts."""

from __future__ import annotations

import json
import shutil

import pytest

from kmec.errors import ModelError
from kmec.models.facts import facts_from_config
from kmec.models.facts_io import count_params_on_disk, facts_for_ref
from kmec.models.load import fingerprint_model
from tests.conftest import build_tiny_model


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(folder)
    return folder


def test_folder_facts_match_the_loaded_model(home, tiny_folder):
    model = build_tiny_model("llama")
    expected = facts_from_config(model.config, name=str(tiny_folder),
                                 fingerprint=fingerprint_model(model),
                                 n_params=sum(p.numel() for p in model.parameters()),
                                 dtype="float32")
    assert facts_for_ref(str(tiny_folder)) == expected


def test_count_params_reads_headers_only(tiny_folder):
    model = build_tiny_model("llama")
    assert count_params_on_disk(tiny_folder) == sum(p.numel() for p in model.parameters())


def test_alias_facts_come_from_the_cache_metadata(home, tiny_folder):
    target = home / "models" / "smollm2-135m"
    shutil.copytree(tiny_folder, target)
    files = {f.name: f.stat().st_size for f in sorted(target.iterdir()) if f.is_file()}
    (target / "kmec_model.json").write_text(json.dumps({"fingerprint": "f" * 64, "files": files}))
    facts = facts_for_ref("smollm2-135m")
    assert facts.name == "smollm2-135m" and facts.fingerprint == "f" * 64
    assert facts.arch == "LlamaForCausalLM" and facts.n_layers == 4


def test_uninstalled_alias_says_how_to_install(home):
    with pytest.raises(ModelError) as e:
        facts_for_ref("smollm2-135m")
    assert "kmec model install smollm2-135m" in e.value.hint


def test_embedding_alias_is_refused(home, tiny_folder):
    target = home / "models" / "minilm"
    shutil.copytree(tiny_folder, target)
    files = {f.name: f.stat().st_size for f in sorted(target.iterdir()) if f.is_file()}
    (target / "kmec_model.json").write_text(json.dumps({"fingerprint": "e" * 64, "files": files}))
    with pytest.raises(ModelError, match="is an embedding model"):
        facts_for_ref("minilm")
