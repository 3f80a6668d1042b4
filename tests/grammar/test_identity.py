"""Identity fixtures: canonical text formats to itself and parses to the same Spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmec.grammar import format_spec, format_text, parse, parse_file
from kmec.grammar.loader import parse_built

IDENTITY = Path(__file__).resolve().parent.parent / "fixtures" / "identity"
CASES = sorted(IDENTITY.glob("*.kmec"))


def dump(spec) -> dict:
    return spec.model_dump(mode="json")


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_canonical_text_is_a_fixed_point(case: Path) -> None:
    text = case.read_text(encoding="utf-8")
    assert format_text(text, path=str(case)) == text


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_format_then_parse_gives_the_same_spec(case: Path) -> None:
    own = parse_built(case.read_text(encoding="utf-8"), str(case)).spec
    again = parse_built(format_spec(own), str(case)).spec
    assert dump(again) == dump(own)
    assert format_spec(again) == format_spec(own)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_fixture_is_a_valid_spec(case: Path) -> None:
    parse_file(case)


def test_merged_spec_formats_to_one_self_contained_file() -> None:
    merged = parse_file(IDENTITY / "full.kmec")
    assert merged.relation("currency") is not None
    text = format_spec(merged, includes=False)
    assert "include" not in text
    flat = parse(text, path=str(IDENTITY / "flat.kmec"), includes=False)
    assert dump(flat.model_copy(update={"includes": merged.includes})) == dump(merged)


def test_at_least_a_few_fixtures() -> None:
    assert len(CASES) >= 5
