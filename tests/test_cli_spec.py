"""``kmec check | fmt | schema`` (exit codes 0 / 1 / 2, output format, in-place writes)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kmec.cli import spec as spec_cli

ROOT = Path(__file__).resolve().parents[1]
GOOD = '''relation capital {
  prompt "The capital of {{ subject }} is"
}

edit france {
  subject "France" relation capital -> "Lyon"
}

claim efficacy >= 0.9
'''
BAD = GOOD.replace("relation capital ->", "relation captial ->")


@pytest.fixture()
def cli():
    app = typer.Typer()
    spec_cli.register(app)

    def invoke(*args: str):
        return CliRunner().invoke(app, list(map(str, args)))

    return invoke


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_check_ok(cli, tmp_path: Path) -> None:
    r = cli("check", write(tmp_path / "good.kmec", GOOD))
    assert r.exit_code == 0, r.output
    assert "ok " in r.stdout and "1 relation, 1 edit, 1 claim" in r.stdout


def test_check_error_prints_located_diagnostic_and_exits_2(cli, tmp_path: Path) -> None:
    path = write(tmp_path / "bad.kmec", BAD)
    r = cli("check", path)
    assert r.exit_code == 2
    assert r.stderr == (f"{path}:6:29: error: unknown relation `captial`\n"
                        '      subject "France" relation captial -> "Lyon"\n'
                        "                                ^^^^^^^\n"
                        "  hint: did you mean 'capital'?\n")


def test_check_folder_and_warnings(cli, tmp_path: Path) -> None:
    write(tmp_path / "a.kmec", GOOD)
    write(tmp_path / "w.kmec", "claim efficacy >= 0.9\n")
    r = cli("check", tmp_path)
    assert r.exit_code == 0
    assert "warning: claims, but no edits" in r.stderr and "1 warning" in r.stdout
    assert cli("check", "--strict", tmp_path).exit_code == 2


def test_check_json(cli, tmp_path: Path) -> None:
    r = cli("check", "--json", write(tmp_path / "bad.kmec", BAD))
    assert r.exit_code == 2
    [report] = json.loads(r.stdout)
    assert report["ok"] is False
    assert report["diagnostics"][0]["line"] == 6 and report["diagnostics"][0]["col"] == 29


def test_check_missing_file_and_empty_folder(cli, tmp_path: Path) -> None:
    r = cli("check", tmp_path / "none.kmec")
    assert r.exit_code == 2 and "spec file not found" in r.stderr
    assert cli("check", tmp_path).exit_code == 2  # nothing to check is an error too


def test_fmt_rewrites_in_place_keeping_mode_and_comments(cli, tmp_path: Path) -> None:
    path = write(tmp_path / "messy.kmec", "seed   1 # keep me\nclaim efficacy>=0.9\n")
    os.chmod(path, 0o644)
    r = cli("fmt", path)
    assert r.exit_code == 0, r.output
    assert path.read_text() == "seed 1  # keep me\n\nclaim efficacy >= 0.9\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "reformatted" in r.stderr
    assert cli("fmt", "--check", path).exit_code == 0  # now formatted


def test_fmt_check_and_diff_write_nothing(cli, tmp_path: Path) -> None:
    messy = "seed   1\n"
    path = write(tmp_path / "messy.kmec", messy)
    r = cli("fmt", "--check", path)
    assert r.exit_code == 1 and "would reformat" in r.stderr
    r = cli("fmt", "--diff", path)
    assert r.exit_code == 0 and "-seed   1\n+seed 1\n" in r.stdout
    assert cli("fmt", "--check", "--diff", path).exit_code == 1
    assert path.read_text() == messy


def test_fmt_refuses_syntax_errors(cli, tmp_path: Path) -> None:
    path = write(tmp_path / "broken.kmec", "edit a {\n")
    r = cli("fmt", path)
    assert r.exit_code == 2 and "never closed" in r.stderr
    assert path.read_text() == "edit a {\n"


def test_fmt_folder(cli, tmp_path: Path) -> None:
    write(tmp_path / "a.kmec", GOOD)
    write(tmp_path / "b.kmec", "seed  2\n")
    r = cli("fmt", "--check", tmp_path)
    assert r.exit_code == 1 and "2 files: 1 would be reformatted, 1 unchanged" in r.stderr


def test_schema(cli) -> None:
    r = cli("schema")
    assert r.exit_code == 0
    schema = json.loads(r.stdout)
    assert schema["title"] == "Spec" and "edits" in schema["properties"]


def test_example_specs_pass_kmec_check(cli) -> None:
    r = cli("check", ROOT / "specs")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("ok ") >= 5


def test_through_the_real_entry_point(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.kmec", BAD)
    r = subprocess.run([sys.executable, "-m", "kmec", "check", str(path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and f"{path}:6:29: error: unknown relation" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "kmec", "fmt", "--check", str(ROOT / "specs")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
