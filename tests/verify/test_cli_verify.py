"""``kmec verify`` / ``kmec audit`` in-process: exit codes 0 / 1 / 2, reports written."""

from __future__ import annotations

import json

import torch

from kmec.artifacts import save_artifact
from kmec.artifacts.payloads import LowRank
from tests.verify.conftest import (
    CLAIMS,
    PARAM,
    artifact_of,
    cli,
    edited_copy,
    make_plan,
    make_spec,
    write_build,
)


def test_verify_passes_with_exit_0_and_writes_reports(setup, tmp_path, tiny_loader, good, capsys):
    build, _ = write_build(setup, tmp_path, [good])
    assert cli("verify", str(build), "--max-examples", "20") == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "all 4 checks hold" in out
    names = sorted(p.name for p in (build / "report").iterdir())
    assert names == [".kmec-output", "junit.xml", "report.html", "report.json", "report.md"]


def test_verify_violation_exits_1_naming_the_claim(setup, tmp_path, tiny_loader, capsys):
    g = torch.Generator().manual_seed(5)
    broad = LowRank(PARAM, torch.randn(32, 1, generator=g) * 3, torch.randn(2048, 1, generator=g) * 3)
    build, _ = write_build(setup, tmp_path, [broad])
    assert cli("verify", str(build), "--report-dir", str(tmp_path / "r")) == 1
    out = capsys.readouterr().out
    # claim labels hold brackets: printed as text, not taken for console markup
    assert "FAIL" in out and "locality[kl<=0.05] on edit 'france'" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["exit_code"] == 1 and any("locality" in f for f in report["failed"])


def test_verify_json_flag(setup, tmp_path, tiny_loader, good, capsys):
    nothing = LowRank(PARAM, torch.zeros(32, 1), torch.zeros(2048, 1))
    build, _ = write_build(setup, tmp_path, [nothing])
    assert cli("verify", str(build / "artifact"), "--json", "--max-examples", "5") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["failed"][0].startswith("efficacy on edit 'france'")


def test_bad_input_exits_2(tmp_path, capsys):
    assert cli("verify", str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli("verify", str(tmp_path / "empty")) == 2
    assert "neither a kmec build directory nor an artifact" in capsys.readouterr().err


def test_bare_artifact_needs_a_spec(setup, tmp_path, good, capsys):
    spec = make_spec(setup.old, setup.new, CLAIMS)
    art = artifact_of([good], setup.fingerprint, make_plan(spec, setup.fingerprint))
    save_artifact(art, tmp_path / "art")
    assert cli("verify", str(tmp_path / "art")) == 2
    assert "--spec" in capsys.readouterr().err


def test_audit_command(setup, tmp_path, good, capsys):
    build, art = write_build(setup, tmp_path, [good])
    setup.model.save_pretrained(tmp_path / "base")
    edited = edited_copy(setup.model, art, setup.fingerprint)
    edited.save_pretrained(tmp_path / "edited")
    assert cli("audit", str(tmp_path / "edited"), "--base", str(tmp_path / "base"),
               "--build", str(build)) == 0
    assert "audit passed" in capsys.readouterr().out
    with torch.no_grad():
        edited.get_parameter("model.layers.0.self_attn.q_proj.weight")[1, 2] += 0.01
    edited.save_pretrained(tmp_path / "tampered")
    assert cli("audit", str(tmp_path / "tampered"), "--base", str(tmp_path / "base"),
               "--build", str(build)) == 1
    out = capsys.readouterr().out
    assert "undeclared parameters moved: model.layers.0.self_attn.q_proj.weight" in out


def test_verify_undeclared_change_exits_1_naming_the_parameter(setup, tmp_path, tiny_loader,
                                                                good, monkeypatch, capsys):
    """A broken apply (or a tampered model) that moves an undeclared weight fails the audit."""
    from kmec.artifacts import apply as real_apply

    def leaky_apply(artifact, model, **kw):
        applied = real_apply(artifact, model, **kw)
        with torch.no_grad():
            model.get_parameter("model.layers.0.mlp.gate_proj.weight")[0, 0] += 1e-3
        return applied

    monkeypatch.setattr("kmec.pipeline.apply", leaky_apply)
    build, _ = write_build(setup, tmp_path, [good])
    assert cli("verify", str(build), "--max-examples", "10") == 1
    out = capsys.readouterr().out
    assert "audit failed: undeclared parameters moved: model.layers.0.mlp.gate_proj.weight" in out
