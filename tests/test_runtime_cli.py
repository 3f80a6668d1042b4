"""``--device`` / ``--dtype`` on the commands: bad values are one clear error (exit 2)
before anything loads, and a build records where it was compiled, which ``kmec plan``,
``kmec verify`` and up-to-date checks read."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_ft_pipeline

CUDA = torch.cuda.is_available()


def cli(*args) -> int:
    from kmec.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


@pytest.fixture()
def tiny_spec(monkeypatch, tmp_path):
    """A one-edit spec that compiles in seconds on a tiny Llama, whose fake loader records
    the runtime it is asked for (the weights stay the float32 CPU ones)."""
    from kmec.grammar import format_spec
    from kmec.models.load import (
        LoadedModel,
        ModelRef,
        Runtime,
        native_bf16,
        resolve_device,
        resolve_dtype,
    )
    from kmec.spec import MethodHint, PromptEdit, Spec

    base = tiny_ft_pipeline(monkeypatch, steps=4)
    asked = []

    def load(ref, *, dtype="float32", device=None, device_map=None):
        asked.append((dtype, device))
        return LoadedModel(base.model, base.tok, base.facts, ModelRef(str(ref), "folder", None),
                           runtime=Runtime(resolve_device(device), resolve_dtype(dtype),
                                           bf16_units=native_bf16(resolve_device(device))))

    monkeypatch.setattr("kmec.models.load.load_model", load)
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    spec = Spec(model="tiny", edits=(PromptEdit(name="q", prompt="Q: key? A:", target="B"),),
                method=MethodHint(max_delta=3.0, layers=(1, 2)))
    path = tmp_path / "spec.kmec"
    path.write_text(format_spec(spec))
    return path, asked


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["compile", "verify", "bench", "trace", "train-editor",
                                     "stats", "apply"])
def test_cuda_without_cuda_is_exit_2_naming_the_devices(command, tmp_path, capsys):
    args = {"compile": ["compile", "x.kmec"], "verify": ["verify", tmp_path],
            "bench": ["bench", "x.kmec", "-m", "rome"], "trace": ["trace", "a prompt"],
            "train-editor": ["train-editor", "--data", tmp_path / "d.json"],
            "stats": ["stats", "smollm2-135m", "--layers", "1"],
            "apply": ["apply", tmp_path, "--out", tmp_path / "o"]}[command]
    # the inputs do not exist: the device is refused before any of them is read
    assert cli(*args, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "devices here: cpu" in err


def test_unknown_dtype_is_exit_2(tiny_spec, tmp_path, capsys):
    path, asked = tiny_spec
    assert cli("compile", path, "-o", tmp_path / "b", "--dtype", "int4") == 2
    assert "unknown dtype 'int4'" in capsys.readouterr().err and not asked


def test_a_build_records_its_runtime_and_is_rebuilt_on_another(tiny_spec, tmp_path, capsys):
    path, asked = tiny_spec
    out = tmp_path / "build"
    assert cli("compile", path, "-o", out, "--budget", "0", "--json") == 0
    first = json.loads(capsys.readouterr().out)
    from kmec.models.load import Runtime, native_bf16

    units = " with bf16 units" if native_bf16("cpu") else ""  # a fact of this machine
    assert first["runtime"] == Runtime("cpu", bf16_units=native_bf16("cpu")).to_json()
    info = json.loads((out / "build.json").read_text())
    assert info["runtime"] == first["runtime"]
    assert f"runtime: cpu{units}, float32" in (out / "compile.log").read_text()
    assert cli("compile", path, "-o", out, "--budget", "0", "--json") == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True
    assert cli("compile", path, "-o", out, "--budget", "0", "--dtype", "bf16", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["up_to_date"] is False and again["runtime"]["dtype"] == "bfloat16"
    assert asked[-1] == ("bf16", None)
    assert json.loads((out / "build.json").read_text())["runtime"]["dtype"] == "bfloat16"
    # verify loads float32 on the CPU whatever the build ran on, and says both
    assert cli("verify", out, "--json", "--max-examples", "3") in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert f"compiled on cpu{units}, bfloat16; verified on cpu{units}, float32" in report["notes"]
    assert asked[-1] == ("float32", None)
    assert cli("verify", out, "--max-examples", "3") in (0, 1)
    assert (f"compiled on cpu{units}, bfloat16; verified on cpu{units}, float32"
            in capsys.readouterr().out)
    assert cli("plan", out) == 0
    assert f"compiled on cpu{units}, bfloat16" in capsys.readouterr().out
    # verifying in bf16 is allowed, and the report says it is not the verdict of record
    assert cli("verify", out, "--json", "--max-examples", "3", "--dtype", "bf16") in (0, 1)
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("verified with bfloat16 weights") and "verdict of record" in n
               for n in notes)
    assert asked[-1] == ("bf16", None)


def test_apply_in_bf16_writes_bf16_weights_that_revert_and_reload(tmp_path, monkeypatch):
    """kmec apply --dtype bfloat16: the base is checked in float32, the folder holds bf16
    weights with the delta added in bf16, load_model checks it, revert restores the bf16 base."""
    from kmec.artifacts.edited import load_edited, revert_folder, write_edited
    from kmec.models.load import fingerprint_model
    from tests.conftest import artifact_for, build_tiny_model, rank_one
    from tests.models.test_runtime import tiny_folder

    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    model, folder = tiny_folder(tmp_path)
    art = artifact_for(model, [rank_one(model)], base_model=str(folder))
    w = write_edited(art, tmp_path / "edited", dtype="bfloat16")
    edited = load_edited(tmp_path / "edited", dtype="bfloat16")
    assert edited.model.get_parameter(w.params[0]).dtype == torch.bfloat16
    assert edited.record.dtype == "bfloat16"
    back = revert_folder(tmp_path / "edited", tmp_path / "base16")
    base16 = build_tiny_model("llama", seed=2).to(torch.bfloat16)
    assert back.base_fingerprint == fingerprint_model(base16)
