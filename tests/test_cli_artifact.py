"""``kmec apply`` / ``kmec revert`` in-process on a tiny model saved as a folder:
the round trip is bit-exact, and every refusal is one clear message, exit 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kmec.artifacts import save_artifact
from kmec.artifacts.edited import BASE_PARAMS, EDIT_RECORD
from kmec.cli import main
from kmec.models.load import fingerprint_model
from tests.conftest import artifact_for, build_tiny_model, rank_one


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def write_tokenizer(folder: Path) -> None:
    """A small real (word-level) tokenizer, so the copy of tokenizer files is tested."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama saved with a tokenizer, and a build directory for it."""
    root = tmp_path_factory.mktemp("cli-artifact")
    model = build_tiny_model("llama", seed=7)
    model.save_pretrained(root / "base")
    write_tokenizer(root / "base")
    art = artifact_for(model, [rank_one(model, layer=2)], base_model=str(root / "base"))
    save_artifact(art, root / "build" / "artifact")
    return root, art


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_apply_revert_round_trip_is_bit_exact(base, tmp_path, capsys):
    root, art = base
    (name,) = art.manifest.params
    # the build directory names its base model: no --model needed
    assert cli("apply", root / "build", "--out", tmp_path / "edited") == 0
    out = capsys.readouterr().out
    assert "applied 1 payload(s) to 1 parameter(s)" in out and "tokenizer copied" in out
    edited, original = weights(tmp_path / "edited"), weights(root / "base")
    assert edited.keys() == original.keys()
    moved = [k for k in original if not torch.equal(edited[k], original[k])]
    assert moved == [name]
    record = json.loads((tmp_path / "edited" / EDIT_RECORD).read_text())
    assert record["base_fingerprint"] == art.manifest.base_fingerprint
    assert record["manifest"] == art.manifest.model_dump(mode="json")
    assert list(load_file(tmp_path / "edited" / BASE_PARAMS)) == [name]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "edited" / f).read_bytes() == (root / "base" / f).read_bytes()

    assert cli("revert", tmp_path / "edited", "--out", tmp_path / "reverted") == 0
    assert f"has the base fingerprint {art.manifest.base_fingerprint[:12]}" in capsys.readouterr().out
    reverted = weights(tmp_path / "reverted")
    assert reverted.keys() == original.keys()
    for k, t in original.items():
        assert t.dtype == reverted[k].dtype and torch.equal(t, reverted[k]), k
    assert (tmp_path / "reverted" / "tokenizer.json").read_bytes() == \
        (root / "base" / "tokenizer.json").read_bytes()
    assert not (tmp_path / "reverted" / EDIT_RECORD).exists()


def test_apply_and_builds_write_files_others_can_read(base, tmp_path):
    """Under umask 022 every file kmec writes is 0644 and every folder 0755 (the atomic
    writes' mkstemp/mkdtemp used to leave 0600/0700: unreadable by a serving container)."""
    import os

    root, art = base
    old = os.umask(0o022)
    try:
        assert cli("apply", root / "build", "--out", tmp_path / "edited") == 0
        save_artifact(art, tmp_path / "build" / "artifact")
    finally:
        os.umask(old)
    for top in (tmp_path / "edited", tmp_path / "build" / "artifact"):
        paths = [top, *top.rglob("*")]
        modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in paths}
        want = {k: oct(0o755 if (tmp_path / k).is_dir() else 0o644) for k in modes}
        assert modes == want and len(modes) > 2


def test_apply_without_tokenizer_and_explicit_model(tmp_path, capsys):
    model = build_tiny_model("gpt2", seed=1)
    model.save_pretrained(tmp_path / "base")
    save_artifact(artifact_for(model, [rank_one(model)], base_model="elsewhere"), tmp_path / "art")
    assert cli("apply", tmp_path / "art", "--model", tmp_path / "base", "-o", tmp_path / "ed") == 0
    assert "tokenizer none" in capsys.readouterr().out
    assert cli("revert", tmp_path / "ed", "-o", tmp_path / "rev") == 0
    assert all(torch.equal(t, weights(tmp_path / "rev")[k])
               for k, t in weights(tmp_path / "base").items())


def error_of(capsys, *args) -> str:
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return re.sub(r"\s+", " ", err)


def test_apply_refuses_another_model(base, tmp_path, capsys):
    root, art = base
    other = build_tiny_model("llama", seed=8)
    other.save_pretrained(tmp_path / "other")
    err = error_of(capsys, "apply", root / "build", "--model", tmp_path / "other",
                   "--out", tmp_path / "x")
    assert f"(fingerprint {art.manifest.base_fingerprint[:12]}), but the model " in err
    assert f"has fingerprint {fingerprint_model(other)[:12]}" in err
    assert "hint: apply it to the model it was compiled for (--model)" in err
    assert not (tmp_path / "x").exists()


def test_apply_names_a_missing_base_model(tmp_path, capsys):
    model = build_tiny_model("gpt2")
    save_artifact(artifact_for(model, [rank_one(model)], base_model="./gone"), tmp_path / "art")
    err = error_of(capsys, "apply", tmp_path / "art", "--out", tmp_path / "x")
    assert "cannot find the artifact's base model: model folder './gone' does not exist" in err
    assert "hint: pass --model with the folder or alias of './gone'" in err


def test_apply_of_a_missing_artifact(tmp_path, capsys):
    err = error_of(capsys, "apply", tmp_path / "nothing", "--out", tmp_path / "x")
    assert "nothing does not exist" in err


@pytest.fixture()
def edited(base, tmp_path):
    root, _ = base
    assert cli("apply", root / "build", "--out", tmp_path / "edited") == 0
    return tmp_path / "edited"


def damage_record(folder: Path, **changes) -> None:
    raw = json.loads((folder / EDIT_RECORD).read_text())
    raw.update(changes)
    (folder / EDIT_RECORD).write_text(json.dumps(raw))


@pytest.mark.parametrize("damage, message", [
    ("plain_model", ("is not a kmec-edited model (no kmec_edit.json) hint: kmec revert only "
                     "undoes folders written by kmec apply")),
    ("missing_folder", "does not exist or is not a folder"),
    ("record_not_json", "kmec_edit.json is not valid JSON"),
    ("record_newer", ("was written in format 'kmec-edited-model/2' (by kmec 2.0.0); this kmec "
                      "(0.1.0) reads 'kmec-edited-model/1'")),
    ("record_field", "is not a valid kmec edit record: tokenizer"),
    ("record_params", "records originals for ['x.weight'] but the artifact edits"),
    ("no_base_params", ("kmec_base_params.safetensors is missing hint: the original weights "
                        "cannot be restored")),
    ("base_params_garbage", "cannot read"),
    ("base_params_tampered", "does not match its recorded sha256 (the file was modified"),
    ("base_params_missing_tensor", ("does not hold the recorded parameters (missing "
                                    "['model.layers.2.mlp.down_proj.weight'], unexpected ['x'])")),
    ("weights_changed", "changed after kmec apply wrote them"),
])
def test_revert_refuses_damaged_folders(base, edited, tmp_path, capsys, damage, message):
    root, _ = base
    target = edited
    params = edited / BASE_PARAMS
    if damage == "plain_model":
        target = root / "base"
    elif damage == "missing_folder":
        target = tmp_path / "nope"
    elif damage == "record_not_json":
        (edited / EDIT_RECORD).write_text("not json")
    elif damage == "record_newer":
        damage_record(edited, format="kmec-edited-model/2", kmec_version="2.0.0")
    elif damage == "record_field":
        damage_record(edited, tokenizer="stolen")
    elif damage == "record_params":
        damage_record(edited, base_params={"x.weight": "0" * 64})
    elif damage == "no_base_params":
        params.unlink()
    elif damage == "base_params_garbage":
        params.write_bytes(b"\x00" * 10)
    elif damage in ("base_params_tampered", "base_params_missing_tensor"):
        tensors = load_file(params)
        if damage == "base_params_tampered":
            next(iter(tensors.values()))[0, 0] += 1e-6
        else:
            tensors = {"x": torch.zeros(1)}
        save_file(tensors, params)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(edited)
        with torch.no_grad():
            model.get_parameter("model.layers.0.mlp.up_proj.weight")[0, 0] += 1.0
        model.save_pretrained(edited)
    err = error_of(capsys, "revert", target, "--out", tmp_path / "out")
    assert message in err
    assert not (tmp_path / "out").exists()
