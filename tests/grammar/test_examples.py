"""The example specs in specs/: every one checks clean and is canonically formatted."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmec.grammar import analyze_dir, analyze_file, format_text, spec_files

SPECS = Path(__file__).resolve().parents[2] / "specs"
FILES = spec_files(SPECS)
EXPECTED = {"capitals", "messi", "kazakhstan", "factcheck", "counterfact20", "chat"}


def test_the_documented_examples_exist() -> None:
    assert EXPECTED <= {p.stem for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_example_checks_clean(path: Path) -> None:
    analysis = analyze_file(path)
    assert analysis.diagnostics == [], "\n".join(d.render() for d in analysis.diagnostics)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_example_is_formatted(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert format_text(text, path=str(path)) == text


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_example_opens_with_the_command_that_runs_it(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(("# Run: kmec compile ", "# Check: kmec check "))
    assert str(path.relative_to(SPECS.parent)) in first


def test_capitals_is_the_readme_demo() -> None:
    spec = analyze_file(SPECS / "examples" / "capitals.kmec").spec
    assert len(spec.edits) >= 10
    assert spec.relation("capital").reverse is not None
    assert all(e.preserve for e in spec.edits)
    locality = [c for c in spec.claims if c.metric == "locality"]
    assert locality and locality[0].sample == 200 and locality[0].neighbours_of == "capital"


def test_counterfact20_has_twenty_edits() -> None:
    spec = analyze_file(SPECS / "examples" / "counterfact20.kmec").spec
    assert len(spec.edits) == 20 and all(e.old for e in spec.edits)


def test_the_whole_folder_checks() -> None:
    assert all(not a.errors for a in analyze_dir(SPECS))
