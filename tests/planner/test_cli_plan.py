"""``kmec plan SPEC [--explain] [--json] [--model REF]``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import kmec.backends
import kmec.planner.model
from kmec.cli.plan import register
from kmec.models.facts import ModelFacts
from tests.planner.helpers import FACTS, fake_registry

SPEC = """\
model "smollm2-135m"
relation capital { prompt "The capital of {{ subject }} is" }
edit kazakhstan { subject "Kazakhstan" relation capital "Astana" -> "Nur-Sultan" }
edit france { subject "France" relation capital -> "Lyon" }
"""


@pytest.fixture()
def app(monkeypatch):
    seen: list[str] = []

    def fake_facts(ref: str) -> ModelFacts:
        seen.append(ref)
        return FACTS["smollm2"].model_copy(update={"name": ref})

    monkeypatch.setattr("kmec.models.facts_io.facts_for_ref", fake_facts)
    monkeypatch.setattr(kmec.backends, "BACKENDS", fake_registry())
    app = typer.Typer()
    app.callback()(lambda: None)  # keep `plan` a subcommand, as in the real CLI
    register(app)
    app.seen = seen  # type: ignore[attr-defined]
    return app


@pytest.fixture()
def spec_file(tmp_path):
    path = tmp_path / "capitals.kmec"
    path.write_text(SPEC)
    return path


def test_json_is_the_canonical_plan(app, spec_file):
    r = CliRunner().invoke(app, ["plan", str(spec_file), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [s["id"] for s in data["steps"]] == ["s01-memit"]
    assert r.output.endswith("}\n") and r.output == json.dumps(data, sort_keys=True, indent=2,
                                                               ensure_ascii=False) + "\n"
    assert app.seen == ["smollm2-135m"]  # the spec's model


def test_model_flag_overrides_the_spec(app, spec_file):
    r = CliRunner().invoke(app, ["plan", str(spec_file), "--json", "--model", "./other"])
    assert r.exit_code == 0, r.output
    assert app.seen == ["./other"] and json.loads(r.output)["model"] == "./other"


def test_default_output_is_a_step_table(app, spec_file):
    r = CliRunner().invoke(app, ["plan", str(spec_file)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "s01-memit" in r.output and "kazakhstan, france" in r.output
    assert "MEMIT inserts them" not in r.output


def test_explain_shows_reasons(app, spec_file):
    r = CliRunner().invoke(app, ["plan", str(spec_file), "--explain"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "MEMIT inserts them with one joint least-squares solve" in r.output


def test_missing_spec_is_a_usage_error(app, tmp_path):
    r = CliRunner().invoke(app, ["plan", str(tmp_path / "nope.kmec")])
    assert r.exit_code == 2


def test_plan_errors_reach_the_caller(app, tmp_path, monkeypatch):
    from kmec.errors import PlanError

    monkeypatch.setattr(kmec.backends, "BACKENDS", fake_registry("rome"))
    path = tmp_path / "s.kmec"
    path.write_text(SPEC)
    r = CliRunner().invoke(app, ["plan", str(path)])
    assert isinstance(r.exception, PlanError)


def test_registered_in_the_real_cli():
    r = subprocess.run([sys.executable, "-m", "kmec", "plan", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "--explain" in r.stdout and "--json" in r.stdout and "--model" in r.stdout


def test_real_cli_plans_a_tiny_model_folder(tmp_path, spec_file):
    """End to end in a subprocess: real registry, real facts from a model folder."""
    import os

    from tests.conftest import build_tiny_model

    folder = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(folder)
    env = {**os.environ, "KMEC_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "kmec", "plan", str(spec_file), "--json",
                        "--model", str(folder)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model_arch"] == "LlamaForCausalLM" and len(data["model_fingerprint"]) == 64
    assert data["steps"][0]["backend"] == "memit" and data["steps"][0]["layers"] == [1, 2]


def test_the_estimate_says_what_it_is_and_takes_cached_statistics_off(app, spec_file,
                                                                      monkeypatch):
    """The planner charges the statistics pass; ``kmec plan`` knows the cache and says
    what a compile with those statistics cached will not spend."""
    from kmec.planner.passes.estimate_cost import statistics_seconds

    monkeypatch.setattr("kmec.cli.plan._cached_layers", lambda facts, ref, req: ())
    r = CliRunner().invoke(app, ["plan", str(spec_file)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "rough estimates for a 2-core x86 CPU" in r.output and "cached" not in r.output

    asked = []

    def cached(facts, ref, req):
        asked.append((ref, req.layers))
        return req.layers[-2:]  # the pass stops after the deepest missing layer

    monkeypatch.setattr("kmec.cli.plan._cached_layers", cached)
    r = CliRunner().invoke(app, ["plan", str(spec_file)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    plan = json.loads(CliRunner().invoke(app, ["plan", str(spec_file), "--json"]).output)
    (step,) = plan["steps"]
    req = kmec.planner.model.StatsRequest(**step["needs_stats"])
    facts = FACTS["smollm2"]
    saved = statistics_seconds(req, facts) - statistics_seconds(req, facts,
                                                                layers=req.layers[:-2])
    assert saved > 0
    assert asked == [("smollm2-135m", req.layers)]
    assert f"~{saved:.0f} s of the ~{step['cost']['seconds']:.0f} s is not spent" in r.output
    assert f"~{step['cost']['seconds'] - saved:.0f} s" in r.output
