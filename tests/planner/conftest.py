"""Fixtures for planner tests (helpers live in ``tests/planner/helpers.py``)."""

from __future__ import annotations

import pytest

from kmec.models.facts import ModelFacts
from tests.planner.helpers import FACTS, FakeBackend, fake_registry


@pytest.fixture()
def registry() -> dict[str, FakeBackend]:
    return fake_registry()


@pytest.fixture()
def smol() -> ModelFacts:
    return FACTS["smollm2"]
