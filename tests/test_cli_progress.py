"""Progress off a terminal: throttled lines with rate and ETA (kmec.cli._progress), and a
compile of a tiny model whose log shows them."""

from __future__ import annotations

import doctest
import json
import logging

import pytest
import torch

from kmec.cli import _progress
from kmec.cli._progress import LineReporter, reporting
from kmec.errors import KmecError
from tests.conftest import SpaceLetterTokenizer, build_tiny_model, tiny_ft_pipeline


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def reporter(interval: float = 5.0) -> tuple[LineReporter, Clock, list[str]]:
    clock, lines = Clock(), []
    return LineReporter("compile", write=lines.append, clock=clock, interval=interval), clock, lines


def test_doctests():
    assert doctest.testmod(_progress).failed == 0


def test_a_count_reports_rate_and_eta_and_is_throttled():
    r, clock, lines = reporter()
    clock.t += 2
    r("δ optimisation", 0, 12)  # a new message: always a line (no rate yet)
    clock.t += 1
    r("δ optimisation", 1, 12)  # 1 s later: held back
    clock.t += 6.5
    r("δ optimisation", 3, 12)  # 7.5 s after the start: 0.4/s, 9 left
    clock.t += 1
    r("δ optimisation", 4, 12)  # held back again
    clock.t += 22
    r("δ optimisation", 12, 12)  # the end of a count: always a line, with its time
    assert lines == ["compile: δ optimisation  0/12\n",
                     "compile: δ optimisation  3/12  0.4/s  ETA 22s\n",
                     "compile: δ optimisation  12/12  0.39/s  in 30s\n"]


def test_a_new_message_is_shown_at_once_and_its_rate_counts_from_the_last_report():
    r, clock, lines = reporter()
    r("loading model", 0, 1)
    clock.t += 3
    r("loading model", 1, 1)
    clock.t += 2  # edit a took 2 s: its line comes at once, with that rate
    r("rome a", 1, 3)
    clock.t += 0.5
    r("train: loss 1.23", 1, 10)
    clock.t += 0.5
    r("train: loss 1.19", 2, 10)  # the same message (text before ':'): throttled
    clock.t += 0.5
    r("train: loss 1.11", 1, 10)  # a count that starts over is a new one
    r.close()
    assert lines[:3] == ["compile: loading model  0/1\n", "compile: loading model  1/1  in 3.0s\n",
                         "compile: rome a  1/3  0.5/s  ETA 4.0s\n"]
    assert lines[3].startswith("compile: train: loss 1.23  1/10")
    assert lines[4].startswith("compile: train: loss 1.11  1/10")
    assert lines[5:] == ["compile: finished in 6.5s\n"]


def test_a_count_around_others_keeps_its_start():
    r, clock, lines = reporter()
    r("verifying the claims", 0, 1)
    clock.t += 4
    r("scoring", 10, 20)
    clock.t += 4
    r("scoring", 20, 20)
    clock.t += 1
    r("verifying the claims", 1, 1)
    assert lines[-1] == "compile: verifying the claims  1/1  in 9.0s\n"
    assert lines[1] == "compile: scoring  10/20  2.5/s  ETA 4.0s\n"


def test_interval_zero_shows_every_update_and_a_message_without_counts():
    r, clock, lines = reporter(interval=0)
    for done in range(3):
        clock.t += 1
        r("scoring", done, 2)
    r("smollm2-135m: fetching", 0, 0)
    assert [x.split("  ")[1].strip() for x in lines[:3]] == ["0/2", "1/2", "2/2"]
    assert lines[3] == "compile: smollm2-135m: fetching\n"


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("KMEC_PROGRESS_INTERVAL", "0.5")
    assert LineReporter("x").interval == 0.5
    monkeypatch.delenv("KMEC_PROGRESS_INTERVAL")
    assert LineReporter("x").interval == _progress.PROGRESS_INTERVAL_S
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("KMEC_PROGRESS_INTERVAL", bad)
        with pytest.raises(KmecError, match="KMEC_PROGRESS_INTERVAL"):
            LineReporter("x")


def test_reporting_writes_lines_to_stderr_and_nothing_when_quiet(monkeypatch, capsys):
    monkeypatch.setenv("KMEC_PROGRESS_INTERVAL", "0")
    kmec_log = logging.getLogger("kmec")
    monkeypatch.setattr(kmec_log, "level", logging.INFO)
    with reporting("stats") as progress, progress.stage("loading tiny"):
        progress("layers 1-2", 100, 300)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "stats: loading tiny  0/1" and lines[-1].startswith("stats: finished in ")
    assert "stats: layers 1-2  100/300" in err and "stats: loading tiny  1/1  in " in err
    monkeypatch.setattr(kmec_log, "level", logging.WARNING)  # kmec --quiet
    with reporting("stats") as progress:
        progress("layers 1-2", 100, 300)
    assert capsys.readouterr() == ("", "")


def test_on_a_terminal_a_rich_bar_is_used(monkeypatch):
    monkeypatch.setattr(logging.getLogger("kmec"), "level", logging.INFO)
    monkeypatch.setattr(_progress, "stderr_is_terminal", lambda: True)
    with reporting("compile") as progress:
        progress("rome a", 1, 3)
        assert isinstance(progress, _progress.BarReporter)
        (task,) = progress.bar.tasks
        assert (task.description, task.completed, task.total) == ("rome a", 1, 3)


def test_alphaedit_reports_its_target_values(tmp_path):
    """δ optimisation reports as it goes (before the layer loop), as MEMIT's does."""
    from kmec.backends import get_backend
    from kmec.backends.base import ExecContext
    from kmec.models.adapters import adapter_for
    from kmec.models.facts import facts_from_config
    from kmec.planner.model import EditRequest, Step
    from tests.backends.conftest import CorpusStats

    model = build_tiny_model("llama", seed=5)
    facts = facts_from_config(model.config, name="tiny", fingerprint="ab" * 32)
    edits = (EditRequest(name="e0", prompt="The key of bcc", subject="bcc", target_new="A"),)
    step = Step(id="s01-alphaedit", backend="alphaedit", edits=edits, layers=(1,),
                params={"value": {"steps": 1}, "project": False})
    calls: list[tuple[str, int, int]] = []
    ctx = ExecContext(model=model, tok=SpaceLetterTokenizer(), adapter=adapter_for("llama"),
                      facts=facts, stats=CorpusStats(model, adapter_for("llama"), (1,)),
                      cache_dir=tmp_path, seed=0,
                      progress=lambda m, d, t: calls.append((m, d, t)))
    get_backend("alphaedit").execute(step, ctx)
    assert calls[0] == ("alphaedit: target values", 1, 1)
    assert calls[-1] == ("alphaedit: layer 1", 1, 1)


def test_target_values_report_each_edit_as_it_reaches_its_target():
    """δ optimisation of one chunk reports edits as they finish, not all at its end."""
    from kmec.backends.values import ValueParams, chunk_bounds, optimise_deltas
    from kmec.models.adapters import adapter_for
    from tests.backends.test_value_cache import EDITS, PREFIXES

    # a target probability the tiny model's edits pass at different steps (or never)
    params = ValueParams(steps=40, weight_decay=0.0, clamp=1e4, edit_batch=4, stop_prob=0.012)
    assert len(chunk_bounds(EDITS, params.edit_batch)) == 1
    calls: list[int] = []
    optimise_deltas(build_tiny_model("llama", seed=3), SpaceLetterTokenizer(),
                    adapter_for("llama"), 1, EDITS, PREFIXES, params, progress=calls.append)
    assert sum(calls) == len(EDITS) and len(calls) >= 2, calls


# ---------------------------------------------------------------- a compile in a CI log


@pytest.fixture()
def tiny_compile(monkeypatch, tmp_path):
    """A free-form edit that plans to ``ft`` (no statistics), for a tiny Llama."""
    from kmec.grammar import format_spec
    from kmec.spec import MethodHint, PromptEdit, Spec

    tiny_ft_pipeline(monkeypatch, steps=6)
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KMEC_PROGRESS_INTERVAL", "0")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    spec = Spec(model="tiny", edits=(PromptEdit(name="q", prompt="Q: key? A:", target="B"),),
                method=MethodHint(max_delta=3.0, layers=(1, 2)))
    path = tmp_path / "spec.kmec"
    path.write_text(format_spec(spec))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


def cli(*args) -> int:
    from kmec.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def test_compile_off_a_terminal_logs_progress_and_prints_json(tiny_compile, tmp_path, capsys):
    out = tmp_path / "build"
    assert cli("compile", tiny_compile, "-o", out, "--json") == 0
    printed = capsys.readouterr()
    data = json.loads(printed.out)  # stdout holds the JSON document and nothing else
    assert data["out"] == str(out) and data["up_to_date"] is False
    assert data["plan_hash"] == json.loads((out / "build.json").read_text())["plan_hash"]
    assert [(s["backend"], s["edits"], s["layers"]) for s in data["steps"]] == \
        [("ft", ["q"], [1, 2])]
    assert data["claims_ok"] is None and data["attempts"] == [] and data["edits"] == 1
    err = printed.err.splitlines()
    assert "compile: loading model  0/1" in err
    assert any(x.startswith("compile: loading model  1/1  in ") for x in err)
    training = [x for x in err if x.startswith("compile: ft: training  ")]
    assert len(training) >= 2  # every update with KMEC_PROGRESS_INTERVAL=0
    assert any("/s  ETA " in x for x in training), training
    assert err[-1].startswith("compile: finished in ")

    # up to date, and with --quiet: the result only
    assert cli("--quiet", "compile", tiny_compile, "-o", out) == 0
    printed = capsys.readouterr()
    assert "compile: " not in printed.err and "up to date" in printed.err
