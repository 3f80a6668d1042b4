"""``$GITHUB_STEP_SUMMARY``: ``kmec verify`` appends a Markdown digest (verdict, claims with
the failing ones first, the failures, where the reports are); a write error only warns."""

from __future__ import annotations

import logging

import torch

from kmec.artifacts.payloads import LowRank
from kmec.verify.summary import append_step_summary
from tests.verify.conftest import PARAM, cli, write_build


def broad_edit() -> LowRank:
    g = torch.Generator().manual_seed(5)
    return LowRank(PARAM, torch.randn(32, 1, generator=g) * 3, torch.randn(2048, 1, generator=g) * 3)


def test_verify_appends_failing_claims_first(setup, tmp_path, tiny_loader, good, monkeypatch,
                                             capsys):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    # the edit is made (efficacy holds), and much else moves with it (locality fails)
    build, _ = write_build(setup, tmp_path, [good, broad_edit()])
    assert cli("verify", str(build), "--report-dir", str(tmp_path / "r"),
               "--max-examples", "10") == 1
    capsys.readouterr()
    text = summary.read_text()
    assert text.startswith("earlier step\n### kmec verify `")
    assert ": FAIL" in text.splitlines()[1]
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    # the locality claim fails and is listed first, although the spec declares efficacy first
    assert rows[0].startswith("| locality\\[kl\\<=0.05\\] | locality | 0.9 |")
    assert rows[0].endswith("| **FAIL** (1 of 1 edits) |")
    assert rows[1].startswith("| efficacy | efficacy | 1 | 1.000 |") and "pass" in rows[1]
    assert "Failing:" in text and "- locality\\[kl\\<=0.05\\] on `france`: 0.000 < 0.9" in text
    assert f"Reports: `{tmp_path / 'r' / 'report.html'}`, `{tmp_path / 'r' / 'junit.xml'}`" in text


def test_an_unwritable_summary_warns_and_the_result_stands(setup, tmp_path, tiny_loader, good,
                                                          monkeypatch, capsys, caplog):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))  # a folder: cannot be appended to
    build, _ = write_build(setup, tmp_path, [good])
    with caplog.at_level(logging.WARNING, logger="kmec"):
        assert cli("verify", str(build), "--max-examples", "10") == 0
    assert "cannot write the step summary" in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_nothing_is_written_without_the_variable(tmp_path):
    assert append_step_summary("x", env={}) is None
    assert append_step_summary("x", env={"GITHUB_STEP_SUMMARY": ""}) is None
    target = tmp_path / "s.md"
    assert append_step_summary("a\n", env={"GITHUB_STEP_SUMMARY": str(target)}) == target
    assert append_step_summary("b\n", env={"GITHUB_STEP_SUMMARY": str(target)}) == target
    assert target.read_text() == "a\nb\n"


def test_doctests():
    import doctest

    from kmec.verify import summary

    assert doctest.testmod(summary).failed == 0
