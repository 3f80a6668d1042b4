"""End to end on the real embedded model: kmec compile && kmec verify, as the README runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import kmec_cli

SPEC = """\
model "smollm2-135m"
seed 0

relation capital {
  prompt "The capital of {{ subject }} is"
  paraphrase "{{ subject }}'s capital city is"
}

edit germany {
  subject "Germany" relation capital "Berlin" -> "Munich"
}

edit japan {
  subject "Japan" relation capital "Tokyo" -> "Osaka"
  preserve "Mount Fuji is located in"
}

claim efficacy >= 0.9
"""


kmec = kmec_cli


@pytest.mark.slow
def test_compile_then_verify_on_the_real_model(real_model, tmp_path):
    (tmp_path / "two.kmec").write_text(SPEC)
    r = kmec("compile", "two.kmec", "-o", "build", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    build = tmp_path / "build"
    for name in ("plan.json", "spec.json", "build.json", "compile.log", "artifact/manifest.json"):
        assert (build / name).exists(), name
    plan = json.loads((build / "plan.json").read_text())
    assert [s["backend"] for s in plan["steps"]] == ["memit"]

    r = kmec("verify", "build", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((build / "report" / "report.json").read_text())
    assert report["ok"] and report["audit"]["ok"]
    assert (build / "report" / "junit.xml").exists() and (build / "report" / "report.html").exists()

    # an unchanged spec recompiles nothing
    t = time.time()
    r = kmec("compile", "two.kmec", "-o", "build", cwd=tmp_path)
    assert r.returncode == 0 and "up to date" in r.stderr
    assert time.time() - t < 60


@pytest.mark.slow
def test_a_new_layer_range_reuses_the_target_values(real_model, kmec_home, tmp_path,
                                                   monkeypatch):
    """Same top layer, other range: the δ optimisation is not run again, and the
    weights equal those of a compile that recomputes everything."""
    home = tmp_path / "home"  # empty step and value caches; the installed model and its stats
    home.mkdir()
    for part in ("models", "stats"):
        if (kmec_home / part).exists():
            (home / part).symlink_to(kmec_home / part)
    monkeypatch.setenv("KMEC_HOME", str(home))
    (tmp_path / "a.kmec").write_text(SPEC)
    (tmp_path / "b.kmec").write_text(SPEC.replace("seed 0\n", "seed 0\nmethod memit layers 5..8\n"))
    assert kmec("compile", "a.kmec", "-o", "a", cwd=tmp_path).returncode == 0
    r = kmec("compile", "b.kmec", "-o", "b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "b" / "compile.log").read_text()
    # 2 edits, each with its paraphrase that the subject opens keyed as an edit of its own
    assert "layers [5, 6, 7, 8]" in log and "target values: 4 of 4 edits reused" in log, log
    r = kmec("compile", "b.kmec", "-o", "c", "--no-cache", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reused" not in (tmp_path / "c" / "compile.log").read_text()

    def tensors(build):
        manifest = json.loads((tmp_path / build / "artifact" / "manifest.json").read_text())
        return [p["tensors"] for p in manifest["payloads"]]

    assert tensors("b") == tensors("c")


@pytest.mark.slow
def test_an_imported_counterfact_spec_compiles_with_the_planners_choice(real_model, tmp_path):
    """kmec import -> compile (no method named: the planner chooses) -> verify."""
    fixture = Path(__file__).parent / "data" / "fixtures" / "counterfact-edit.json"
    r = kmec("import", "counterfact", str(fixture), "-o", "cf.kmec", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "cf.kmec").read_text().splitlines()
    assert not any(line.startswith("method") for line in lines)  # the planner decides

    r = kmec("compile", "cf.kmec", "-o", "build", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "build" / "plan.json").read_text())
    assert [s["backend"] for s in plan["steps"]] == ["memit"]
    assert sum(len(s["edits"]) for s in plan["steps"]) == 3

    r = kmec("verify", "build", "--max-examples", "4", cwd=tmp_path)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: a claim failed, reported
    report = json.loads((tmp_path / "build" / "report" / "report.json").read_text())
    efficacy = [c for c in report["claims"] if c["metric"] == "efficacy"]
    assert len(efficacy) == 3 and all(c["status"] == "pass" for c in efficacy), efficacy
    assert report["exit_code"] == r.returncode
