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


def _load(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_easyedit_protocol_reads_argmax_tokens_at_the_target_positions():
    """bench_editing --protocol easyedit: batched argmax tokens equal one-by-one ones; token
    accuracy compares them with the target; locality compares two models' argmax tokens."""
    import torch

    from tests.conftest import SpaceLetterTokenizer, build_tiny_model

    bench = _load("bench_editing")
    model, tok = build_tiny_model("llama"), SpaceLetterTokenizer()
    pairs = [("The capital of Peru is", "Lima"), ("A", "Bogota Town"), ("Fact: x is ", "Quito")]
    got = bench.argmax_tokens(model, tok, pairs, batch=2)
    for (prompt, target), (ids, pred) in zip(pairs, got):
        full = tok.encode(prompt + bench.target_text(prompt, target), add_special_tokens=False)
        n = len(tok.encode(bench.target_text(prompt, target), add_special_tokens=False))
        assert ids == full[-n:]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0]
        assert pred == logits[len(full) - n - 1:len(full) - 1].argmax(-1).tolist()
    rec = {"prompt": "The capital of Peru is", "new": "Lima", "paraphrases": ["A"],
           "neighbours": [("Fact: x is ", "Quito"), ("The capital of Peru is", "Cusco")]}
    rows, before = bench.easyedit_scores(model, tok, [rec])
    ids, pred = got[0]
    assert rows[0]["rewrite"] == sum(a == b for a, b in zip(ids, pred)) / len(ids)
    assert "locality" not in rows[0]
    again, _ = bench.easyedit_scores(model, tok, [rec], before)
    assert again[0]["locality"] == 1.0  # the same model keeps every argmax token
