"""The planner's doctests (each pass documents itself with a runnable example)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "kmec.planner",
    "kmec.planner.draft",
    "kmec.planner.layers",
    "kmec.planner.explain",
    "kmec.planner.passes.resolve",
    "kmec.planner.passes.choose_backend",
    "kmec.planner.passes.pair_reversals",
    "kmec.planner.passes.group_edits",
    "kmec.planner.passes.choose_layers",
    "kmec.planner.passes.choose_params",
    "kmec.planner.passes.require_stats",
    "kmec.planner.passes.estimate_cost",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no doctest"
    assert result.failed == 0


def test_every_pass_has_a_docstring_and_example():
    from kmec.planner import PASSES

    for p in PASSES:
        assert p.__doc__ and ">>>" in p.__doc__, p.__name__
