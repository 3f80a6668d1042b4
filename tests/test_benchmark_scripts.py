"""Every benchmark script still imports: the names it takes from kmec exist (a refactoring
that moves them must move the scripts along). Running them is what BENCHMARKS.md records."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # definitions only: each script runs under __main__
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
