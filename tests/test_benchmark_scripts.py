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


def test_the_editing_benchmark_gives_a_columns_standard_error():
    """Per-record scores of 0/1 on 4 records: sample sd / √n; one record has no error bar."""
    import math

    bench = _load("bench_editing")
    rows = [{"rephrase": x} for x in (0.0, 1.0, 1.0, 0.0)]
    assert bench.standard_error(rows, "rephrase") == pytest.approx(math.sqrt(1 / 3) / 2)
    assert bench.standard_error([{"rephrase": 1.0}] * 5, "rephrase") == 0.0
    assert math.isnan(bench.standard_error(rows[:1], "rephrase"))


def test_the_edit_speed_benchmark_ends_with_its_line(tmp_path):
    """bench_edit_speed on a tiny model with tiny sizes: ROME and MEMIT timed against the unit,
    the last line in its exact format with positive numbers."""
    import functools
    import re

    from kmec.backends.base import ExecContext
    from kmec.models.adapters import adapter_for
    from kmec.models.facts import facts_from_config
    from tests.conftest import CorpusStats, SpaceLetterTokenizer, build_tiny_model

    bench = _load("bench_edit_speed")
    model, tok = build_tiny_model("llama"), SpaceLetterTokenizer()
    adapter = adapter_for(model.config.model_type)
    ctx = ExecContext(model=model, tok=tok, adapter=adapter,
                      facts=facts_from_config(model.config, name="tiny"),
                      stats=CorpusStats(model, adapter, range(4)), cache_dir=tmp_path, seed=0)
    lines: list[str] = []
    result = bench.measure(ctx, bench.builtin_records()[:4], rome_edits=2, memit_batch=3,
                           memit_rounds=1, unit_rows=4, unit_tokens=6, log=lines.append)
    line = bench.last_line(result)
    m = re.fullmatch(r"rome_units=(\S+) memit_units_per_edit=(\S+) unit_s=(\S+)", line)
    assert m and all(float(x) > 0 for x in m.groups()), line
    assert [x.split(":")[0] for x in lines] == ["rome", "rome", "memit"]
    assert not list((tmp_path / "values").glob("*"))  # no δ was cached, none reused
    seen: list[str] = []
    body = type(ctx.model.base_model)  # what the δ loop's steps run
    real = body.forward

    @functools.wraps(real)  # cache_kwarg reads the wrapped signature
    def spy(self, *a, **k):
        seen.append(str(next(self.parameters()).dtype))
        return real(self, *a, **k)

    body.forward = spy
    try:  # --compute bfloat16: the δ loop runs a bf16 copy, the unit stays fp32
        bench.measure(ctx, bench.builtin_records()[:4], rome_edits=1, memit_batch=2,
                      memit_rounds=1, unit_rows=4, unit_tokens=6, compute="bfloat16")
    finally:
        body.forward = real
    assert {"torch.bfloat16", "torch.float32"} <= set(seen)


def test_the_edit_speed_benchmark_reads_both_counterfact_formats(tmp_path):
    import json

    bench = _load("bench_edit_speed")
    rome = {"requested_rewrite": {"subject": "Peru", "prompt": "The capital of {} is",
                                  "target_new": {"str": "Quito"}, "target_true": {"str": "Lima"}}}
    easy = {"subject": "Peru", "prompt": "The capital of Peru is", "target_new": "Quito",
            "ground_truth": "Lima"}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rome, easy]))
    want = {"subject": "Peru", "prompt": "The capital of Peru is", "new": "Quito", "true": "Lima"}
    assert bench.read_records(path) == [want, want]
    assert [r.target_new for r in bench.requests([want], 3, 1)] == ["Quito"] * 3


def test_sequential_batches_protect_exactly_the_earlier_batches(tiny_models):
    """--batch-size 100 (the AlphaEdit paper's protocol): each step holds its batch's
    edits and protects every edit of the batches before it, none of its own."""
    from types import SimpleNamespace

    from kmec.models.facts import facts_from_config

    bench = _load("bench_sequential")
    model = tiny_models["llama"]
    lm = SimpleNamespace(facts=facts_from_config(model.config, name="tiny", fingerprint="f" * 64,
                                                 n_params=1000))
    records = [{"case_id": i, "prompt": f"{s} was born in", "subject": s, "target_new": "Rome",
                "ground_truth": "Paris"} for i, s in enumerate(("Ann", "Bo", "Cy", "Di", "Ed"))]
    steps = bench.batch_plan(records, lm, 2)
    assert [len(s.edits) for s in steps] == [2, 2, 1]
    assert [s.backend for s in steps] == ["alphaedit"] * 3
    for b, s in enumerate(steps):
        protected = [p["name"] for p in s.params["protect"]]
        assert protected == [f"cf{i}" for i in range(2 * b)]
        assert [e.name for e in s.edits] == [f"cf{i}" for i in range(2 * b, min(2 * b + 2, 5))]
    assert len(bench.batch_plan(records, lm, 1)) == 5
    # --param and --layers: applied after the variant's change, statistics follow the layers
    step = bench.variant_step(steps[1], "noproj", ("null_space_rel=0.03", "value.lr=0.5"), (1, 2))
    assert step.params["project"] is False and step.params["null_space_rel"] == 0.03
    assert step.params["value"]["lr"] == 0.5 and steps[1].params.get("value", {}).get("lr") != 0.5
    assert step.layers == (1, 2) and step.needs_stats.layers == (1, 2)
    assert [p["name"] for p in step.params["protect"]] == ["cf0", "cf1"]
    assert bench.parse_layers("3-5") == (3, 4, 5) and bench.parse_layers("2,7") == (2, 7)
    with pytest.raises(ValueError, match="KEY=JSON"):
        bench.variant_step(steps[0], "alphaedit", ("null_space_rel",))


@pytest.mark.parametrize("argv, says", [(["--layers", "x-2"], "bad --layers value"),
                                        (["--param", "null_space_rel"], "expected KEY=JSON"),
                                        (["--param", "a=notjson"], "is not JSON"),
                                        (["--data", "no/such.json"], "no such file")])
def test_the_sequential_benchmark_refuses_bad_overrides_before_loading(monkeypatch, capsys, argv, says):
    bench = _load("bench_sequential")
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr("sys.argv", ["bench_sequential.py", *argv])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and says in capsys.readouterr().err
