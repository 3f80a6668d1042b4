"""``kmec verify … | cat`` and ``kmec compile … | cat``: off a terminal no table cell is
cut short and no line is wrapped, whatever width the terminal around the pipe has."""

from __future__ import annotations

import pytest

from tests.verify.conftest import cli, write_build
from tests.verify.test_repair_loop import loop_env  # noqa: F401  (the fixture)


@pytest.fixture(autouse=True)
def _narrow_terminal(monkeypatch):
    """A shell 80 columns wide around the pipe (rich would take that width) and no COLUMNS."""
    import os

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", lambda *_: os.terminal_size((80, 24)))


def test_verify_summary_prints_in_full(setup, tmp_path, tiny_loader, good, capsys):
    build, _ = write_build(setup, tmp_path, [good])
    assert cli("verify", str(build), "--max-examples", "5") == 0
    out = capsys.readouterr().out
    assert "…" not in out
    header = next(line for line in out.splitlines() if "claim" in line and "protocol" in line)
    for column in ("threshold", "declared", "held out", "failing edits"):
        assert column in header
    assert "locality[kl<=0.05]" in out


def test_a_long_list_of_failing_edits_says_how_many_more():
    from kmec.cli import verify

    assert verify._first([f"e{i}" for i in range(9)], 6) == "e0, e1, e2, e3, e4, e5 and 3 more"


def test_compile_lines_are_not_wrapped(loop_env, capsys):  # noqa: F811
    code = cli("compile", str(loop_env["spec"]), "-o", str(loop_env["out"]), "--budget", "600")
    assert code == 0
    err = capsys.readouterr().err
    attempts = [line for line in err.splitlines() if line.startswith("attempt ")]
    assert len(attempts) == 2 and all(" + verify " in line for line in attempts), err
    done = next(line for line in err.splitlines() if ": compiled in " in line)
    assert done.endswith(f"-> {loop_env['out']}/")
