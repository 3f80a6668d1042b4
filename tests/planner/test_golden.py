"""Golden plans: ``tests/fixtures/plans/*.kmec`` ↔ ``*.plan.json``, compared byte-for-byte.

Regenerate after an intended change with ``KMEC_UPDATE_GOLDEN=1`` (see the
README next to the fixtures) and review the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kmec.hashing import atomic_write_text
from kmec.planner import plan
from tests.planner.helpers import FACTS, GOLDEN_VERSION, fake_registry

FIXTURES = Path(__file__).parents[1] / "fixtures" / "plans"
CASES = sorted(FIXTURES.glob("*.kmec"))
UPDATE = os.environ.get("KMEC_UPDATE_GOLDEN") == "1"


def header(text: str) -> dict[str, str]:
    """``# key: value`` lines at the top of a fixture."""
    return dict(re.findall(r"^# (\w+): (.*)$", text, flags=re.MULTILINE))


def golden_plan(path: Path) -> str:
    from kmec.grammar import parse

    text = path.read_text()
    meta = header(text)
    spec = parse(text, path=path.name)
    editors = meta.get("editors", "").split()
    return plan(spec, FACTS[meta["facts"]], backends=fake_registry(), editors=editors,
                kmec_version=GOLDEN_VERSION).to_json()


def test_fixtures_exist():
    assert len(CASES) >= 10
    for case in CASES:
        assert {"title", "facts"} <= header(case.read_text()).keys(), case.name


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden_plan(case):
    expected_path = case.with_suffix(".plan.json")
    actual = golden_plan(case)
    if UPDATE:
        atomic_write_text(expected_path, actual)
    assert expected_path.exists(), f"no golden for {case.name}: run with KMEC_UPDATE_GOLDEN=1"
    assert actual == expected_path.read_text(), (
        f"plan for {case.name} changed; if intended, regenerate with KMEC_UPDATE_GOLDEN=1")


def test_no_orphan_goldens():
    stems = {c.stem for c in CASES}
    orphans = [p.name for p in FIXTURES.glob("*.plan.json") if p.name[:-10] not in stems]
    assert not orphans
