"""The docstring examples of kmec.grammar run and pass."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kmec.grammar

MODULES = sorted(f"kmec.grammar.{m.name}" for m in pkgutil.iter_modules(kmec.grammar.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_pure_functions_have_examples() -> None:
    results = [doctest.testmod(importlib.import_module(n), optionflags=doctest.ELLIPSIS)
               for n in MODULES]
    assert sum(r.attempted for r in results) >= 20  # there are examples ...
    assert sum(r.failed for r in results) == 0  # ... and they run
