"""Tampered builds (issue #19): every field that changes weights is hashed and tied to the plan.

Each test edits a build the way the hostile-input probe did and checks that
``kmec verify`` (and ``kmec audit``, and compile's up-to-date check) refuses
it with exit code 2 and a message naming the field.
"""

from __future__ import annotations

import json

import pytest

from kmec.artifacts import MANIFEST, Manifest
from kmec.artifacts.build import read_build, up_to_date
from kmec.hashing import canonical_json
from kmec.planner.model import Plan
from tests.verify.conftest import cli, write_build


@pytest.fixture()
def build(setup, tmp_path, good):
    b, _ = write_build(setup, tmp_path, [good])
    return b


def edit_manifest(build, change, *, reseal=False):
    path = build / "artifact" / MANIFEST
    raw = json.loads(path.read_text())
    change(raw)
    if reseal:  # a forger who also recomputes the manifest's own hash
        raw = Manifest.model_validate(raw).sealed().model_dump(mode="json")
    path.write_text(canonical_json(raw))


def scale(raw):
    raw["payloads"][0]["scale"] = 1.6


def other_layer(raw):
    raw["payloads"][0]["param"] = "model.layers.0.mlp.down_proj.weight"


def traversal(raw):
    raw["payloads"][0]["id"] = "../p0000"


@pytest.mark.parametrize("change, reseal, message", [
    (scale, False, "field(s) payloads[0].scale changed"),
    (other_layer, False, "field(s) payloads[0].param changed"),
    (other_layer, True, "may change only model.layers.1.mlp.down_proj.weight (field 'param')"),
    (traversal, False, "is not a valid manifest: payloads.0.id"),
])
def test_verify_refuses_a_tampered_manifest(build, tiny_loader, capsys, change, reseal, message):
    edit_manifest(build, change, reseal=reseal)
    assert cli("verify", str(build), "--max-examples", "5") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_resealed_scale_is_caught_by_build_json(build, tiny_loader, capsys):
    edit_manifest(build, scale, reseal=True)
    assert cli("verify", str(build), "--max-examples", "5") == 2
    assert "does not record this artifact (field 'artifact_sha256')" in capsys.readouterr().err


def test_plan_and_build_record_must_agree(build, tiny_loader, capsys):
    plan = Plan.model_validate_json((build / "plan.json").read_text())
    (build / "plan.json").write_text(plan.model_copy(update={"seed": 7}).to_json())
    assert cli("verify", str(build)) == 2
    assert "(field 'plan_hash')" in capsys.readouterr().err


def test_a_tampered_build_is_not_up_to_date(build):
    plan = read_build(build)[0]
    assert up_to_date(build, plan) is not None  # (artifact, build.json)
    edit_manifest(build, scale)
    assert up_to_date(build, plan) is None


def test_audit_with_the_wrong_base_says_so(setup, build, tmp_path, capsys):
    from tests.conftest import build_tiny_model

    build_tiny_model("llama", seed=99).save_pretrained(tmp_path / "other")
    setup.model.save_pretrained(tmp_path / "edited")
    assert cli("audit", str(tmp_path / "edited"), "--base", str(tmp_path / "other"),
               "--build", str(build)) == 2
    err = capsys.readouterr().err
    assert "this artifact was compiled for base model" in err and "undeclared" not in err


def test_verify_refuses_a_stale_build(setup, build, tiny_loader, tmp_path, capsys):
    """The spec file a build was compiled from changed: recompile, or pass --spec (#10)."""
    from kmec.grammar import format_spec

    source = tmp_path / "spec.kmec"  # the path write_build records
    compiled = read_build(build)[1]
    source.write_text(format_spec(compiled))
    assert cli("verify", str(build), "--max-examples", "5") in (0, 1)  # same spec: not stale
    capsys.readouterr()
    changed = compiled.model_copy(update={"seed": compiled.seed + 1})
    source.write_text(format_spec(changed))
    assert cli("verify", str(build)) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "--spec" in err
    source.write_text("relation {")
    assert cli("verify", str(build)) == 2
    assert "no longer parses" in capsys.readouterr().err
