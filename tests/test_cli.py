"""CLI basics: errors are one message and exit code 2; --debug shows the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                          env=env)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("kmec ")


def test_bad_model_is_one_clear_message(tmp_path, monkeypatch):
    import os
    env = {**os.environ, "KMEC_HOME": str(tmp_path)}
    r = run("model", "info", "nosuchmodel", env=env)
    assert r.returncode == 2
    assert "error: unknown model 'nosuchmodel'" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("--debug", "model", "info", "nosuchmodel", env=env)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_usage_error_exit_code_2():
    r = run("model", "info")
    assert r.returncode == 2


def test_model_list(tmp_path):
    import os
    r = run("model", "list", env={**os.environ, "KMEC_HOME": str(tmp_path), "COLUMNS": "200"})
    assert r.returncode == 0
    assert "smollm2-135m" in r.stdout and "kmec model install smollm2-135m" in r.stdout


@pytest.mark.slow
def test_model_info_real(real_model):
    r = run("model", "info", "smollm2-135m")
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout and "30" in r.stdout and "Paris" in r.stdout


def test_tables_are_not_cut_off_a_terminal(monkeypatch):
    """Piped output (a CI log) gets a width no kmec table reaches; COLUMNS still rules."""
    import io

    from kmec.cli._console import PIPE_WIDTH, out_console

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert out_console().width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "100")
    assert out_console().width == 100


@pytest.mark.parametrize("args", [["--help"], ["verify", "--help"], ["diff", "--help"],
                                  ["model", "list", "--help"]])
def test_every_help_lists_the_exit_codes(args):
    r = subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Exit codes: 0 success; 1 a verdict against you" in text and "2 bad input" in text
