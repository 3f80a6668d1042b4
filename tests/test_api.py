"""kmec.edit, the one-call API, on a tiny Llama: records, spec text and spec files compile to
the same plan; the edit takes and revert restores the exact weights; verify checks the
(default) claims without disturbing the edit; save writes a build the build reader and the
verifier's reader accept; bad records and arguments are KmecErrors before any model loads.

Constrained fine-tuning (``method ft``) is used: it needs no key statistics, so a tiny model
with a byte tokenizer can be edited for real in about a second.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kmec
from kmec.api import records_spec
from kmec.artifacts.build import read_build
from kmec.backends import BACKENDS
from kmec.backends.finetune import FinetuneParams
from kmec.errors import KmecError, ModelError, SpecError
from kmec.grammar import format_spec
from kmec.hashing import spec_hash
from kmec.outputs import OutputError
from kmec.pipeline import load_inputs
from kmec.spec import Claim
from tests.backends.test_finetune import LAYERS, LOOSE, tiny_lm
from tests.conftest import assert_identical, snapshot

PROMPT = "The key of bcc"
RECORD = {"prompt": "The key of {subject}", "subject": "bcc", "target_new": "B"}
ARGS = {"method": "ft", "layers": LAYERS, "max_delta": 3.0}
SPEC_TEXT = f"""model "tiny"
method ft layers 0..3 max_delta 3.0

edit bcc {{
  prompt "{PROMPT}" -> "B"
  subject "bcc"
}}

claim efficacy >= 0.9
"""


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    """A private KMEC_HOME, one torch thread, and fine-tuning steps large enough for a
    random model (as in tests/backends/test_finetune.py)."""
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(type(BACKENDS["ft"]), "default_params",
                        lambda self, facts: FinetuneParams(lr=LOOSE["lr"], steps=LOOSE["steps"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_records_become_a_checked_spec_of_prompt_edits():
    spec = records_spec([
        {"prompt": "The capital of {subject} is", "subject": "France", "target_new": "Lyon",
         "scope": ["{subject}'s capital city is"], "preserve": "The capital of Spain is"},
        kmec.Fact(prompt="{{ subject }} lies in", subject="Oslo", target_new="Asia"),
        {"prompt": "{} plays", "subject": "Messi", "target_new": "tennis"},
        {"prompt": "The CEO of Apple is", "subject": "Apple", "target_new": "Ada",
         "target_old": "Tim Cook", "name": "apple-ceo"},
        {"prompt": "The capital of {subject} was", "subject": "France", "target_new": "Paris"},
    ], model="tiny")
    assert spec.model == "tiny" and spec.source == "<records>"
    e = spec.edits
    assert [x.kind for x in e] == ["prompt"] * 5
    assert [x.name for x in e] == ["france", "oslo", "messi", "apple-ceo", "france_2"]
    assert (e[0].prompt, e[0].subject, e[0].target) == ("The capital of France is", "France",
                                                         "Lyon")
    assert e[0].scope == ("France's capital city is",)
    assert e[0].preserve == ("The capital of Spain is",)
    assert e[1].prompt == "Oslo lies in" and e[2].prompt == "Messi plays"
    assert e[3].old == "Tim Cook" and e[3].prompt == "The CEO of Apple is"
    # what came out is what the formatter writes and the parser reads back
    assert spec_hash(kmec.parse(format_spec(spec))) == spec_hash(spec)


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "The key of {subject}", "target_new": "B"}], "edit record 1 has no 'subject'"),
    ([RECORD, {"prompt": "The key is", "subject": "bcc", "target_new": "B"}],
     "edit record 2: the subject 'bcc' does not occur in the prompt 'The key is'"),
    ([{**RECORD, "target": "B"}], "unknown field 'target'"),
    ([{**RECORD, "target_new": ""}], "'target_new' must be a non-empty string"),
    ([{**RECORD, "subject": 7}], "'subject' must be a non-empty string, not 7"),
    ([{**RECORD, "scope": [3]}], "'scope[0]' must be a non-empty string"),
    ([{**RECORD, "prompt": "The key of {{ subjet }}"}], "is not a valid template"),
    ([{**RECORD, "prompt": "The key of {{ subject | upper }}"}],
     "the subject 'bcc' does not occur in the prompt 'The key of BCC'"),
    ([{**RECORD, "name": "2x"}], "name '2x' is not a spec name"),
    ([("The key of bcc", "B")], "edit record 1 is a tuple, not an edit record"),
    ([], "no edits were given"),
    (3.5, "cannot read edits from a float"),
    ("missing.kmec", "spec file 'missing.kmec' does not exist"),
])
def test_bad_edits_are_clear_kmec_errors_before_the_model_loads(lm, records, message):
    with pytest.raises(KmecError) as info:
        kmec.edit(lm, records, **ARGS)
    assert message in str(info.value)


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(KmecError) as info:
        records_spec([{**RECORD, "targetnew": "B"}])
    assert info.value.hint == "did you mean 'target_new'?"


def test_bad_arguments_get_the_languages_messages(lm):
    with pytest.raises(SpecError, match="unknown method `fine`"):
        kmec.edit(lm, RECORD, method="fine")
    with pytest.raises(SpecError, match="threshold"):
        kmec.edit(lm, RECORD, claims=["efficacy >= 2"], **ARGS)
    with pytest.raises(SpecError, match="unknown relation"):
        kmec.edit(lm, RECORD, claims=["locality >= 0.9 neighbours of capital"], **ARGS)
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        kmec.edit("no-such-model", RECORD)


def test_edit_takes_generates_and_revert_restores_the_exact_weights(lm):
    before = snapshot(lm.model)
    e = kmec.edit(lm, [kmec.Fact(prompt="The key of {subject}", subject="bcc", target_new="B")],
                  **ARGS)
    assert e.model is lm.model and e.applied and e.plan.steps[0].backend == "ft"
    assert e.generate(PROMPT, max_new_tokens=2) == " B B"
    assert any(not torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    # a second edit on the edited weights is refused, not stacked silently
    with pytest.raises(KmecError, match="earlier kmec.edit still applied"):
        kmec.edit(lm, RECORD, **ARGS)
    e.revert()
    assert not e.applied
    assert_identical(lm.model, before)
    assert e.generate(PROMPT, max_new_tokens=2) != " B B"
    e.revert()  # a second revert does nothing
    assert_identical(lm.model, before)
    with pytest.raises(KmecError, match="reverted"):
        e.verify()
    with pytest.raises(KmecError, match="max_new_tokens"):
        e.generate(PROMPT, max_new_tokens=0)


def test_arguments_replace_only_what_they_name():
    from kmec.api import _with_arguments

    spec = kmec.parse(SPEC_TEXT)
    hint = _with_arguments(spec, method=None, layers=None, max_delta=0.5, claims=None,
                           seed=7)
    assert (hint.method.method, hint.method.layers, hint.method.max_delta) == ("ft", LAYERS, 0.5)
    assert hint.seed == 7 and hint.claims == spec.claims
    assert _with_arguments(spec, method="rome", layers=[2], max_delta=None, claims=None,
                           seed=None).method.layers == (2,)


def test_records_text_and_file_compile_the_same_plan(lm, tmp_path):
    path = tmp_path / "edit.kmec"
    path.write_text(SPEC_TEXT)
    plans = []
    claims = {0: [Claim(metric="efficacy", threshold=0.9)], 1: ["claim efficacy >= 0.9"]}
    for i, edits in enumerate(([RECORD | {"name": "bcc"}], SPEC_TEXT, path, str(path))):
        e = kmec.edit(lm, edits, **(ARGS if i == 0 else {}), claims=claims.get(i))
        try:
            plans.append(e.plan.sha256)
            assert e.generate(PROMPT, max_new_tokens=1) == " B"
        finally:
            e.revert()
    assert len(set(plans)) == 1


def test_verify_checks_default_claims_and_leaves_the_edit_in_place(lm):
    e = kmec.edit(lm, RECORD | {"preserve": ["The key of zvj"]}, **ARGS)
    try:
        assert [c.metric for c in e.spec.claims] == ["efficacy", "locality"]
        edited = snapshot(lm.model)
        report = e.verify(max_examples=5)
        assert {r.metric for r in report.claims} == {"efficacy", "locality"}
        assert next(r for r in report.claims if r.metric == "efficacy").status == "pass"
        assert_identical(lm.model, edited)  # the edit was taken out for the copy and put back
    finally:
        e.revert()


def test_a_budget_scores_and_repairs_the_claims_as_compile_does(lm):
    e = kmec.edit(lm, RECORD, budget=120, **ARGS)
    try:
        assert e.compiled.claims_ok is True and e.compiled.budget == 120
        assert [a.rung for a in e.compiled.attempts] == ["planned"]
    finally:
        e.revert()
    unscored = kmec.edit(lm, RECORD, **ARGS)
    unscored.revert()
    assert unscored.compiled.claims_ok is None and unscored.compiled.attempts == ()


def test_save_writes_a_build_the_readers_accept(lm, tmp_path):
    e = kmec.edit(lm, RECORD, **ARGS)
    e.revert()
    build = e.save(tmp_path / "build")
    plan, spec, info, artifact = read_build(build)
    assert plan == e.plan and spec_hash(spec) == spec_hash(e.spec)
    assert artifact.manifest.sha256 == e.artifact.manifest.sha256
    assert info["model"] == "tiny" and info["spec_path"] == str(build / "spec.kmec")
    # the records were written out as a spec, which kmec verify's reader checks against the plan
    assert spec_hash(kmec.parse((build / "spec.kmec").read_text())) == plan.spec_hash
    inputs = load_inputs(build)
    assert inputs.plan == plan and inputs.model == "tiny"
    assert "compile.log" in os.listdir(build)
    e.save(build)  # kmec wrote it: replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputError):
        e.save(foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_save_of_an_unchanged_spec_file_records_that_file(lm, tmp_path):
    path = tmp_path / "edit.kmec"
    path.write_text(SPEC_TEXT)
    e = kmec.edit(lm, path)
    e.revert()
    build = e.save(tmp_path / "build")
    info = json.loads((build / "build.json").read_text())
    assert info["spec_path"] == str(path.resolve()) and not (build / "spec.kmec").exists()
    assert load_inputs(build).plan == e.plan  # the file is not stale


def test_import_kmec_stays_free_of_torch():
    code = "import kmec, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "notebook_edit.py"
THREADS = torch.get_num_threads()  # before _env pins one thread for the tiny model


def test_the_notebook_example_is_six_lines_of_code():
    lines = [ln for ln in EXAMPLE.read_text().splitlines() if ln.strip()]
    assert len(lines) <= 6 and not any(ln.lstrip().startswith("#") for ln in lines)
    assert sum("kmec.edit(" in ln for ln in lines) == 1


@pytest.mark.slow
def test_the_notebook_example_edits_and_reverts_the_real_model(kmec_home, monkeypatch, capsys):
    """examples/notebook_edit.py on SmolLM2-135M: ROME moves the Eiffel Tower to Rome, and
    revert brings Paris back (the user's cache: its statistics are shared with the e2e tests)."""
    monkeypatch.setenv("KMEC_HOME", str(kmec_home))
    from kmec.models.load import install_alias

    install_alias("smollm2-135m")
    torch.set_num_threads(THREADS)  # the real model uses every core (_env restores its count)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out] == ["edited", "reverted"]
    assert out[0].startswith("edited:  Rome") and out[1].startswith("reverted:  Paris"), out


def test_doctests():
    import doctest

    import kmec.api

    assert doctest.testmod(kmec.api).failed == 0
