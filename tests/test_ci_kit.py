"""The CI kit: examples/ci/github-actions.yml run as a script on a tiny model, with
``$GITHUB_STEP_SUMMARY`` set, and the pre-commit hooks of .pre-commit-hooks.yaml."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_ft_pipeline

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "ci" / "github-actions.yml"
HOOKS = ROOT / ".pre-commit-hooks.yaml"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def job() -> dict:
    (only,) = workflow()["jobs"].values()
    return only


def kmec_lines(step: dict) -> list[str]:
    """The commands of a ``run:`` step that invoke kmec (one per line)."""
    return [line.strip() for line in step.get("run", "").splitlines()
            if line.strip().startswith("kmec ")]


def test_workflow_caches_kmec_home_pins_cpu_torch_and_uploads_reports():
    steps = job()["steps"]
    uses = {s.get("uses", "").split("@")[0]: s for s in steps if "uses" in s}
    assert uses["actions/cache"]["with"]["path"] == "${{ env.KMEC_HOME }}"
    assert "KMEC_HOME" in job()["env"]
    install = next(s["run"] for s in steps if "pip install" in s.get("run", ""))
    torch_line = next(line for line in install.splitlines() if "torch" in line)
    assert re.search(r'"torch==[0-9.]+"', torch_line) and "whl/cpu" in torch_line
    assert install.index("torch==") < install.index("KMEC_PACKAGE")  # torch first
    upload = uses["actions/upload-artifact"]
    assert upload["if"] == "always()"
    paths = upload["with"]["path"]
    assert "report/report.html" in paths and "report/junit.xml" in paths
    commands = [c for s in steps for c in kmec_lines(s)]
    assert any(c.startswith("kmec compile ") for c in commands)
    assert any(c.startswith("kmec verify ") for c in commands)


@pytest.fixture()
def tiny_project(monkeypatch, tmp_path):
    """A repository with one spec for a tiny Llama (``load_model`` returns it, whatever
    the reference), compiled with fine-tuning: no statistics pass."""
    from kmec.grammar import format_spec
    from kmec.spec import Claim, MethodHint, PromptEdit, Spec

    tiny_ft_pipeline(monkeypatch, steps=4)
    spec = Spec(model="tiny", edits=(PromptEdit(name="q", prompt="Q: key? A:", target=" B"),),
                method=MethodHint(max_delta=3.0, layers=(1, 2)),
                # the pipeline is under test, not the edit: a claim a tiny random model meets
                claims=(Claim(metric="efficacy", threshold=0.0),))
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "edits.kmec").write_text(format_spec(spec))
    (tmp_path / ".git").mkdir()  # the repository root: the spec may read under it
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _expand(command: str, env: dict[str, str]) -> list[str]:
    """A step's command line as the shell would split it, with ``$VAR``/``"$VAR"`` expanded."""
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), word)
            for word in shlex.split(command)]


def test_workflow_steps_run_as_a_script(tiny_project, monkeypatch, capsys):
    """Every kmec command of the workflow, in order, in the job's environment (the model
    install is skipped by its own condition: KMEC_MODEL is empty for a non-alias model)."""
    from kmec.cli import main

    summary = tiny_project / "summary.md"
    summary.write_text("## an earlier step's summary\n")  # steps share the file: appended to
    env = {k: str(v) for k, v in job()["env"].items()}
    env.update(KMEC_MODEL="", KMEC_HOME=str(tiny_project / "home"),
               GITHUB_STEP_SUMMARY=str(summary))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ran: list[tuple[str, int]] = []
    for step in job()["steps"]:
        condition = str(step.get("if", ""))
        if "env.KMEC_MODEL != ''" in condition and not env["KMEC_MODEL"]:
            continue
        for command in kmec_lines(step):
            args = _expand(command, env)
            with pytest.raises(SystemExit) as e:
                main(args[1:])
            ran.append((args[1], e.value.code))
    capsys.readouterr()
    assert ran == [("fmt", 0), ("check", 0), ("compile", 0), ("verify", 0)]
    report = tiny_project / "build" / "report"
    assert (report / "report.html").is_file() and (report / "junit.xml").is_file()
    text = summary.read_text()
    assert text.startswith("## an earlier step's summary\n")
    assert text.count("| claim | metric | threshold | score | declared | held out | result |") == 2
    assert "### kmec compile `specs/edits.kmec`: claims hold" in text
    assert "### kmec verify `build`: PASS" in text
    assert re.search(r"\| efficacy \| efficacy \| 0 \| [01]\.\d{3} \|.*\| pass \(1 edits\) \|",
                     text)
    assert "build/report/junit.xml" in text


# ---------------------------------------------------------------- pre-commit


def test_pre_commit_hooks_are_real_kmec_commands(tmp_path):
    hooks = {h["id"]: h for h in yaml.safe_load(HOOKS.read_text())}
    assert set(hooks) == {"kmec-fmt", "kmec-check"}
    for hook in hooks.values():
        assert hook["language"] == "python" and hook["files"] == r"\.kmec$"
        assert re.search(hook["files"], "specs/a.kmec") and not re.search(hook["files"], "a.py")
        assert hook["entry"].split()[0] == "kmec"
    good = tmp_path / "good.kmec"
    good.write_text('edit a {\n  prompt "The capital of France is" -> "Rome"\n}\n')
    messy = tmp_path / "messy.kmec"
    messy.write_text('edit a {   prompt "The capital of France is" -> "Rome" }\n')
    broken = tmp_path / "broken.kmec"
    broken.write_text('edit a {\n  prompt "The capital of France is" "Rome"\n}\n')

    def run(hook: str, *files: Path) -> subprocess.CompletedProcess[str]:
        # pre-commit appends the staged files' names to the entry
        entry = shlex.split(hooks[hook]["entry"])
        return subprocess.run([sys.executable, "-m", "kmec", *entry[1:], *map(str, files)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

    assert run("kmec-fmt", good).returncode == 0
    fmt = run("kmec-fmt", good, messy)
    assert fmt.returncode == 1 and "would reformat" in fmt.stderr
    assert messy.read_text().startswith("edit a {   prompt")  # --check writes nothing
    assert run("kmec-check", good).returncode == 0
    check = run("kmec-check", good, broken)
    assert check.returncode == 2 and "broken.kmec:2:" in check.stdout + check.stderr
