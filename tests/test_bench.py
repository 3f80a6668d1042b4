"""``kmec bench``: argument errors, the Markdown table, and a real comparison run."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys

import pytest

import kmec.bench as bench_module
from kmec.bench import BenchResult, BenchRow, render_markdown

SPEC = """\
model "smollm2-135m"
seed 0

relation capital {
  prompt "The capital of {{ subject }} is"
  paraphrase "{{ subject }}'s capital city is"
}

edit germany {
  subject "Germany" relation capital "Berlin" -> "Munich"
  preserve "Mount Fuji is located in"
}

edit japan {
  subject "Japan" relation capital "Tokyo" -> "Osaka"
  preserve "The Eiffel Tower is located in"
}

claim efficacy >= 0.9
claim generality >= 0.5
claim locality >= 0.8 kl 0.5
"""


def kmec(*args, cwd):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, check=False)


def test_doctests():
    assert doctest.testmod(bench_module).failed == 0


def test_two_modes_are_refused(tmp_path):
    (tmp_path / "s.kmec").write_text(SPEC)
    r = kmec("bench", "s.kmec", "--methods", "rome", "--single", "--batch", cwd=tmp_path)
    assert r.returncode == 2
    assert "choose one mode, not --single and --batch" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_spec_and_unknown_method(tmp_path):
    r = kmec("bench", "nope.kmec", "--methods", "rome", cwd=tmp_path)
    assert r.returncode == 2 and "no spec file 'nope.kmec'" in r.stderr
    (tmp_path / "s.kmec").write_text(SPEC)
    r = kmec("bench", "s.kmec", "--methods", "rome,memitt", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown method 'memitt'" in r.stderr and "did you mean 'memit'" in r.stderr


def test_markdown_lists_only_claimed_metrics_and_errors():
    rows = (BenchRow(method="rome", edits=2, scores={"efficacy": 1.0, "generality": 0.75,
                                                     "locality": None},
                     passed=3, checks=4, compile_s=9.0, s_per_edit=4.5, verify_s=8.0, peak_mb=246),
            BenchRow(method="ft", edits=0, scores={}, passed=0, checks=0, compile_s=0,
                     s_per_edit=0, verify_s=0, peak_mb=0, error="backend 'ft' is not available"))
    md = render_markdown(BenchResult(kmec_version="0", spec="s.kmec", model="m", fingerprint="ab" * 32,
                                     mode="single", edits=2, stats_s=1.0, rows=rows))
    lines = md.splitlines()
    assert lines[2] == "| method | efficacy | generality | claims held | s/edit | peak MB |"
    assert lines[4] == "| rome | 1.000 | 0.750 | 3/4 | 4.50 | 246 |"
    assert lines[5].startswith("| ft | – | – | – | – | error: backend 'ft'")


@pytest.mark.slow
def test_bench_compares_methods_on_the_real_model(real_model, tmp_path):
    (tmp_path / "s.kmec").write_text(SPEC)
    r = kmec("bench", "s.kmec", "--methods", "rome,memit", "--single", "--max-examples", "4",
             "--json", "--md", "table.md", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["mode"] == "single" and result["edits"] == 2
    assert [row["method"] for row in result["rows"]] == ["rome", "memit"]
    for row in result["rows"]:
        assert row["error"] is None
        assert row["edits"] == 2 and row["checks"] == 6
        assert row["scores"]["efficacy"] >= 0.5  # one edit taking is the least a backend does
        assert 0.0 <= row["scores"]["locality"] <= 1.0
        assert row["scores"]["portability"] is None  # not claimed
        assert row["s_per_edit"] > 0 and row["peak_mb"] > 0
    md = (tmp_path / "table.md").read_text()
    assert "| rome |" in md and "| memit |" in md

    r = kmec("bench", "s.kmec", "--methods", "alphaedit", "--sequence", "--max-examples", "4",
             "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    assert row["edits"] == 2 and row["scores"]["retention"] is not None


def test_bench_compiles_without_the_prompts_it_scores_and_says_so():
    """The default compile view shows the compiler only the edit prompts; the full spec
    is verified, so every paraphrase, preserve, neighbour and reverse prompt is held out."""
    from kmec.backends import BACKENDS
    from kmec.grammar import parse
    from kmec.planner import plan as make_plan
    from kmec.planner.draft import example_facts
    from kmec.verify.claims import build_cases, compiled_prompts

    spec = parse(SPEC.replace('preserve "Mount Fuji is located in"',
                                   'preserve "Mount Fuji is located in"\n  expect reversal')
                      .replace('paraphrase "{{ subject }}\'s capital city is"',
                               'paraphrase "{{ subject }}\'s capital city is"\n'
                               '  reverse "{{ object }} is the capital of"'))
    spec = spec.model_copy(update={"method": spec.method.model_copy(update={"method": "memit"})})
    view = bench_module.compile_view(spec)
    plan = make_plan(view, example_facts(), backends=BACKENDS)
    assert all(not s.protect and all(not r.scope and not r.preserve and not r.inverse
                                     for r in s.edits) for s in plan.steps)
    seen = compiled_prompts(plan, spec)
    assert seen == {"The capital of Germany is", "The capital of Japan is"}
    germany = build_cases(spec, plan)[0]  # the full spec's probes on the view's plan
    assert [p.prompt for p in germany.generality] == ["Germany's capital city is"]
    assert germany.reversal[0].prompt == "Munich is the capital of"
    declared = make_plan(spec, example_facts(), backends=BACKENDS)
    assert "Germany's capital city is" in compiled_prompts(declared, spec)

    result = BenchResult(kmec_version="0", spec="s.kmec", model="m", fingerprint="ab" * 32,
                         mode="batch", edits=2, stats_s=1.0, rows=(), prompts="held out")
    assert "kept out of compilation" in render_markdown(result)
    assert "compiled as written" in render_markdown(result.model_copy(update={"prompts":
                                                                               "declared"}))
