"""Golden diagnostics: each tests/fixtures/errors/*.kmec with its exact expected output.

Each fixture opens with a comment saying what it shows; its ``.expected``
companion holds every diagnostic exactly as ``kmec check`` prints it. Set
KMEC_UPDATE_GOLDEN=1 to rewrite the companions after a deliberate change (and
review the diff).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmec.errors import SpecError
from kmec.grammar import analyze_file, parse_file

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CASES = sorted((FIXTURES / "errors").glob("*.kmec"))


def rendered(diagnostics) -> str:
    return "".join(d.render() + "\n" for d in diagnostics)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden_diagnostics(case: Path, monkeypatch) -> None:
    monkeypatch.chdir(FIXTURES)  # spans then read errors/<name>.kmec
    name = f"errors/{case.name}"
    analysis = analyze_file(name)
    got = rendered(analysis.diagnostics)
    expected = case.with_suffix(".expected")
    if os.environ.get("KMEC_UPDATE_GOLDEN") == "1":
        expected.write_text(got, encoding="utf-8")
    assert got == expected.read_text(encoding="utf-8")
    assert analysis.errors, "an error fixture must contain an error"
    assert case.read_text(encoding="utf-8").startswith("# "), "say what the fixture shows"
    with pytest.raises(SpecError) as info:
        parse_file(name)
    assert str(info.value) == rendered(analysis.errors).rstrip("\n")
    assert info.value.span == analysis.errors[0].span


def test_every_error_fixture_has_its_expectation() -> None:
    stems = {p.stem for p in CASES}
    assert stems == {p.stem for p in (FIXTURES / "errors").glob("*.expected")}
    assert len(stems) >= 30
