"""Hostile specs and misused outputs (issue #19): each defect of the probe, as a regression test.

A spec may read only regular, bounded files under its root; no error quotes a
file that is not a spec; outputs never destroy what kmec did not write;
templates cannot loop or compute; reports escape what a spec wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmec.cli import main
from kmec.errors import SpecError
from kmec.grammar import analyze_file, parse_file
from kmec.grammar.files import MAX_SPEC_BYTES, MAX_SUBJECTS_BYTES, find_root
from kmec.grammar.templates import inspect, render
from kmec.outputs import MARKER, OutputError

SECRET = "kmec-test-secret-4f1d"
REL = 'relation capital {{\n  prompt "The capital of {{{{ subject }}}} is"\n  {extra}\n}}\n'
EDIT = 'edit kz { subject "Kazakhstan" relation capital "Astana" -> "Nur-Sultan" }\n'


def cli(*args: object) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return int(e.value.code or 0)


def run_kmec(*args: object, timeout: float = 60, cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    """kmec in a child process, for inputs that could hang or exhaust memory if mishandled."""
    env = dict(os.environ, KMEC_TEST_SECRET=SECRET)
    return subprocess.run([sys.executable, "-m", "kmec", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A repository root (``.git``) holding a spec folder."""
    (tmp_path / ".git").mkdir()
    (tmp_path / "specs").mkdir()
    return tmp_path


def spec_with(repo: Path, text: str, name: str = "s.kmec") -> Path:
    path = repo / "specs" / name
    path.write_text(text)
    return path


def messages(path: Path, root: Path | None = None) -> str:
    return "\n".join(d.render() for d in analyze_file(path, root=root).diagnostics)


# ---------------------------------------------------------------- 1. confinement


def test_find_root_is_the_repository(repo):
    assert find_root(repo / "specs" / "s.kmec") == repo.resolve()


@pytest.mark.parametrize("target, rule", [
    ("/proc/self/environ", "is an absolute path"),
    ("/etc/passwd", "is an absolute path"),
    ("../../../../../../etc/passwd", "lies outside the root"),
    ("~/x.kmec", "is an absolute path"),
    (".env", "is hidden"),
    ("secret.txt", "is not a .kmec file"),
])
def test_include_reads_only_spec_files_under_the_root(repo, monkeypatch, target, rule):
    monkeypatch.setenv("KMEC_TEST_SECRET", SECRET)
    (repo / "specs" / "secret.txt").write_text(f"TOKEN={SECRET}\n")
    (repo / "specs" / ".env").write_text(f"TOKEN={SECRET}\n")
    path = spec_with(repo, f'include "{target}"\n')
    text = messages(path)
    assert rule in text and SECRET not in text and "root:" not in text


def test_include_through_a_symlink_leaving_the_root(repo, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "evil.kmec"
    outside.write_text(f"secret {SECRET}\n")
    (repo / "specs" / "link.kmec").symlink_to(outside)
    text = messages(spec_with(repo, 'include "link.kmec"\n'))
    assert "symbolic link that leaves the root" in text and SECRET not in text


def test_include_of_a_symlink_to_a_kernel_file(repo):
    (repo / "specs" / "env.kmec").symlink_to("/proc/self/environ")
    text = messages(spec_with(repo, 'include "env.kmec"\n'))
    assert "leaves the root" in text


@pytest.mark.parametrize("target, rule", [
    ("/proc/self/environ", "is an absolute path"),
    ("../../../../../../etc/passwd", "lies outside the root"),
    (".env", "is hidden"),
])
def test_subjects_from_is_confined(repo, monkeypatch, target, rule):
    (repo / "specs" / ".env").write_text(f"{SECRET}\n")
    path = spec_with(repo, REL.format(extra=f'subjects from "{target}"') + EDIT)
    text = messages(path)
    assert rule in text and SECRET not in text


def test_subjects_from_kinds_of_file(repo):
    os.mkfifo(repo / "specs" / "fifo.txt")
    (repo / "specs" / "folder.txt").mkdir()
    with open(repo / "specs" / "huge.txt", "wb") as f:
        f.truncate(MAX_SUBJECTS_BYTES + 1)  # sparse: nothing is written or read
    for name, rule in (("fifo.txt", "is not a regular file"), ("folder.txt", "is a folder"),
                       ("huge.txt", "over the limit")):
        text = messages(spec_with(repo, REL.format(extra=f'subjects from "{name}"') + EDIT))
        assert rule in text, (name, text)


def test_root_option_widens_the_root(repo, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")
    (shared / "countries.txt").write_text("France\n")
    (shared / "specs").mkdir()
    spec = shared / "specs" / "s.kmec"
    spec.write_text(REL.format(extra='subjects from "../countries.txt"') + EDIT)
    assert "outside the root" in messages(spec)  # no repository: the root is the spec's folder
    assert parse_file(spec, root=shared).relations[0].subjects_file == "../countries.txt"


def test_verify_reads_subjects_under_the_build_root(repo):
    """A build's recorded spec path cannot move the root: verify confines to --root or the
    repository of the build folder (kmec.pipeline), and the reader refuses escapes."""
    from kmec.grammar import subjects_of
    from kmec.spec import Relation, Spec

    rel = Relation(name="r", prompt="{{ subject }} is", subjects_file="etc/passwd")
    forged = Spec(relations=(rel,), source="/forged.kmec")
    with pytest.raises(SpecError, match="outside the root"):
        subjects_of(forged, rel, root=repo)


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "symlink_zero", "huge"])
def test_cli_spec_paths_must_be_regular_bounded_files(tmp_path, kind):
    path = tmp_path / "s.kmec"
    if kind == "dev_zero":
        path = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink_zero":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as f:
            f.truncate(MAX_SPEC_BYTES + 1)
    for command in ("check", "fmt"):
        t0 = time.perf_counter()
        r = run_kmec(command, path, timeout=60)
        assert r.returncode == 2, (command, r.stderr)
        assert "Traceback" not in r.stderr and time.perf_counter() - t0 < 60
        assert any(w in r.stderr for w in ("not a regular file", "kernel file", "over the limit",
                                           "leaves the root")), r.stderr


def test_committed_symlink_to_environ_is_not_read(repo):
    (repo / "specs" / "env.kmec").symlink_to("/proc/self/environ")
    r = run_kmec("check", repo / "specs")
    assert r.returncode == 2 and SECRET not in r.stderr + r.stdout


# ---------------------------------------------------------------- 4. bounded templates


@pytest.mark.parametrize("template", [
    "{{ 9**(9**10) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ subject }}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**10 }}{{ subject }}",
    "{{ subject | replace('a', subject) }}",
    "{% set x = subject %}{{ x }}",
    "{{ subject.__class__ }}",
    "{{ cycler.__init__.__globals__ }}{{ subject }}",
])
def test_templates_cannot_loop_or_compute(template):
    t0 = time.perf_counter()
    assert inspect(template).error is not None
    with pytest.raises(SpecError):
        render(template, subject="Paris")
    assert time.perf_counter() - t0 < 5


def test_check_refuses_a_hostile_template_quickly(repo):
    path = spec_with(repo, REL.replace("{{{{ subject }}}}", "{{{{ 9**(9**10) }}}}{{{{ subject }}}}")
                     .format(extra="") + EDIT)
    t0 = time.perf_counter()
    assert cli("check", path) == 2
    assert time.perf_counter() - t0 < 10


def test_rendered_prompts_are_bounded():
    with pytest.raises(SpecError, match="over 10,000"):
        render("{{ subject | replace('a', '" + "b" * 200 + "') }}", subject="a" * 9000)
    with pytest.raises(SpecError, match="characters"):
        render("{{ subject }}", subject="x" * 20_000)


# ---------------------------------------------------------------- 2. outputs


@pytest.fixture()
def spec_file(repo) -> Path:
    return spec_with(repo, REL.format(extra="") + EDIT)


def test_compile_refuses_to_replace_a_folder_it_did_not_write(repo, spec_file, capsys):
    mine = repo / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "thesis.tex").write_text("years of work")
    assert cli("compile", spec_file, "-o", mine) == 2
    err = capsys.readouterr().err
    assert "files kmec did not write" in err and "--force" in err
    assert (mine / "sub" / "thesis.tex").read_text() == "years of work"


def test_compile_refuses_a_file_as_output(repo, spec_file, capsys):
    target = repo / "notes.txt"
    target.write_text("keep me")
    assert cli("compile", spec_file, "-o", target) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "keep me"


@pytest.mark.parametrize("where, rule", [
    ("cwd", "current folder"),
    ("under_file", "is a file, not a folder"),
    ("proc", "kernel file system"),
    ("spec_folder", "holds one of this command's inputs"),
])
def test_compile_output_paths_never_allowed(repo, spec_file, monkeypatch, capsys, where, rule):
    monkeypatch.chdir(repo)
    (repo / "plain").write_text("x")
    out = {"cwd": ".", "under_file": repo / "plain" / "build", "proc": "/proc/kmec-build",
           "spec_folder": repo / "specs"}[where]
    assert cli("compile", spec_file, "-o", out, "--force") == 2
    assert rule in capsys.readouterr().err
    assert spec_file.exists() and (repo / "plain").read_text() == "x"


def test_apply_into_its_own_build_is_refused(tmp_path, capsys):
    build = tmp_path / "build"
    (build / "artifact").mkdir(parents=True)
    (build / "plan.json").write_text("{}")
    assert cli("apply", build, "--out", build) == 2
    assert "is one of this command's inputs" in capsys.readouterr().err
    assert (build / "plan.json").exists()


def test_revert_and_import_refuse_foreign_outputs(tmp_path, capsys):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("a")
    assert cli("revert", tmp_path / "edited", "--out", tmp_path / "keep") == 2
    assert "--force" in capsys.readouterr().err
    data = Path(__file__).parent / "data" / "fixtures" / "counterfact.json"
    mine = tmp_path / "mine.kmec"
    mine.write_text("# my own spec\n")
    assert cli("import", "counterfact", data, "--limit", "1", "-o", mine) == 2
    assert mine.read_text() == "# my own spec\n"
    fresh = tmp_path / "fresh.kmec"
    assert cli("import", "counterfact", data, "--limit", "1", "-o", fresh) == 0
    # a spec kmec import wrote may be written again
    assert cli("import", "counterfact", data, "--limit", "2", "-o", fresh) == 0
    assert cli("import", "counterfact", data, "-o", data) == 2  # never its own input


def test_verify_report_dir_is_checked_before_verifying(tmp_path, capsys, monkeypatch):
    from kmec import pipeline as vb

    def boom(*a, **k):
        raise AssertionError("verification ran before the report folder was checked")

    import importlib

    monkeypatch.setattr(importlib.import_module("kmec.verify"), "verify", boom)
    monkeypatch.setattr(vb, "load_inputs", lambda *a, **k: None)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x").write_text("x")
    with pytest.raises(OutputError, match="files kmec did not write"):
        vb.verify_build(tmp_path, report_dir=tmp_path / "theirs")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        vb.verify_build(tmp_path, report_dir=tmp_path / "plain" / "report")


def test_report_dir_unwritable_is_a_clear_error(tmp_path):
    from kmec.outputs import ensure_folder

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write to"):
        ensure_folder(tmp_path / "file" / "report", "report")


def test_force_replaces_and_marks(tmp_path):
    from kmec.hashing import atomic_dir
    from kmec.outputs import check_output, write_marker

    theirs = tmp_path / "out"
    theirs.mkdir()
    (theirs / "x").write_text("x")
    with pytest.raises(Exception, match="--force"):
        check_output(theirs, "build")
    check_output(theirs, "build", force=True)
    with atomic_dir(theirs) as tmp:
        write_marker(tmp, "build")
    assert (theirs / MARKER).exists() and not (theirs / "x").exists()
    check_output(theirs, "build")  # now kmec's own
    with pytest.raises(Exception, match="kmec build directory, not a edited model folder|"
                       "not a"):
        check_output(theirs, "edited-model")


# ---------------------------------------------------------------- 7. models: safetensors only


def test_a_pickle_only_model_folder_is_refused(tmp_path):
    from kmec.errors import ModelError
    from kmec.models.load import load_model

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match="pickle files .*safetensors only"):
        load_model(str(folder))


# ---------------------------------------------------------------- 9. audit messages


def test_audit_of_huge_finite_weights_is_not_called_non_finite():
    import torch

    from kmec.artifacts import audit, build_artifact
    from kmec.artifacts.payloads import LowRank
    from tests.conftest import build_tiny_model

    base = build_tiny_model("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        base.get_parameter(name).fill_(3e37)
    edited = build_tiny_model("llama")
    edited.load_state_dict(base.state_dict())
    art = build_artifact([("s", [LowRank(name, torch.zeros(32, 1), torch.zeros(64, 1))])],
                         base_model="t", base_fingerprint="f", base_arch="a",
                         weight_layout="out_in", plan_hash="p")
    result = audit(base, edited, art)
    assert result.ok and not result.nonfinite, result.summary()
