"""`budget` in a spec: seconds or minutes, checked, formatted, and out of the hash when unset."""

from __future__ import annotations

import pytest

from kmec.errors import SpecError
from kmec.grammar import format_text, parse
from kmec.hashing import spec_hash


def test_budget_in_seconds_and_minutes():
    assert parse("budget 300\n").budget == 300.0
    assert parse("budget 5 min\n").budget == 300.0
    assert parse("budget 0\n").budget == 0.0


def test_an_unset_budget_leaves_the_spec_hash_alone():
    assert "budget" not in parse("seed 1\n").model_dump()
    assert spec_hash(parse("seed 1\n")) != spec_hash(parse("seed 1\nbudget 60\n"))


@pytest.mark.parametrize(("text", "message", "col"), [
    ("budget 3 hours\n", "unknown time unit 'hours'", 10),
    ("budget -3\n", "budget -3 s must not be negative", 8),
])
def test_bad_budgets_point_at_the_text(text, message, col):
    with pytest.raises(SpecError) as e:
        parse(text)
    d = e.value.diagnostics[0]
    assert message in d.message and d.span.col == col


def test_budget_is_formatted_in_seconds():
    assert format_text("budget 5 min\nseed 2\n") == "seed 2\nbudget 300\n"
