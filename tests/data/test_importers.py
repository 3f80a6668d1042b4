"""Importers: real records (tests/data/fixtures) -> specs that check, round-trip and say
what they left out."""

from __future__ import annotations

import doctest
import hashlib
import importlib
import json
from pathlib import Path

import pytest

from kmec.data import DATASETS, detect, import_file, import_records
from kmec.errors import KmecError
from kmec.grammar import analyze, format_text, parse, render
from kmec.spec import PromptEdit, TripleEdit, strip_spans

FIXTURES = Path(__file__).parent / "fixtures"
FILES = [
    ("counterfact", "counterfact.json"),
    ("counterfact", "counterfact-edit.json"),
    ("zsre", "zsre_mend_eval.json"),
    ("mquake", "mquake.json"),
    ("knowedit", "knowedit_wiki_cf.json"),
    ("knowedit", "knowedit_wiki_recent.json"),
    ("knowedit", "knowedit_zsre.json"),
]


def load(dataset: str, name: str, **kw):
    return import_file(dataset, FIXTURES / name, **kw)


def edits(imp) -> dict:
    return {e.name: e for e in imp.spec.edits}


def header(imp) -> str:
    return "\n".join(imp.header)


@pytest.mark.parametrize(("dataset", "name"), FILES)
def test_spec_checks_cleanly_and_round_trips(dataset: str, name: str) -> None:
    imp = load(dataset, name)
    text = imp.text
    analysis = analyze(text, path="imported.kmec")
    assert [d.render() for d in analysis.diagnostics] == []
    assert strip_spans(analysis.spec) == strip_spans(imp.spec)
    assert format_text(text) == text  # `kmec fmt --check` leaves it alone
    assert all(line.startswith("#") for line in imp.header)
    sha = hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest()
    assert f"# sha256: {sha}" in imp.header
    assert imp.header[1] == f"#   kmec import {dataset} {FIXTURES / name}"
    assert {c.metric for c in imp.spec.claims} >= {"efficacy", "locality"}


@pytest.mark.parametrize(("dataset", "name"), FILES)
def test_detect_recognises_each_file(dataset: str, name: str) -> None:
    records = json.loads((FIXTURES / name).read_text())
    assert {detect(r) for r in records} == {dataset}


def test_counterfact_rome_record_is_a_triple_edit() -> None:
    imp = load("counterfact", "counterfact.json")
    record = json.loads((FIXTURES / "counterfact.json").read_text())[0]
    e = edits(imp)["cf_0"]
    assert isinstance(e, TripleEdit)
    assert (e.subject, e.relation, e.old, e.new) == ("Danielle Darrieux", "P103", "French",
                                                     "English")
    rel = imp.spec.relation("P103")
    assert rel.prompt == "The mother tongue of {{ subject }} is"
    assert render(rel.prompt, subject=e.subject) == "The mother tongue of Danielle Darrieux is"
    assert e.scope == tuple(record["paraphrase_prompts"])
    assert set(e.preserve) == set(record["neighborhood_prompts"])
    assert [c.protocol for c in imp.spec.claims] == ["prob"] * len(imp.spec.claims)
    text = header(imp)
    assert "40 attribute_prompts" in text and "40 generation_prompts" in text
    assert "40 expected answers of neighborhood_prompts" in text


def test_counterfact_one_relation_per_template_and_contradictions_dropped() -> None:
    imp = load("counterfact", "counterfact.json")
    # records 110 and 722 give (Istanbul, P190) two targets through two templates
    assert "cf_2580" in edits(imp) and "cf_17403" not in edits(imp)
    assert "1 records that contradict an earlier edit" in header(imp)
    assert "cf_17403" in header(imp)
    templates = {r.name: r.prompt for r in imp.spec.relations}
    assert templates["P190"] == "{{ subject }} is a twin city of"
    assert len(set(templates.values())) == len(templates)


def test_counterfact_easyedit_format_is_detected_and_read() -> None:
    imp = load("counterfact", "counterfact-edit.json")
    assert "EasyEdit" in imp.header[0]
    e = edits(imp)["cf_0"]
    assert isinstance(e, PromptEdit)
    assert (e.prompt, e.subject, e.old, e.target) == (
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French", "English")
    assert e.scope == ("Where Danielle Darrieux is from, people speak the language of",)
    assert e.preserve == ("Michel Rocard is a native speaker of",)
    assert "cf_10022" not in edits(imp) and "cf_10022" in header(imp)


def test_zsre_record() -> None:
    imp = load("zsre", "zsre_mend_eval.json")
    e = edits(imp)["zsre_0"]
    assert isinstance(e, PromptEdit)
    assert (e.prompt, e.target, e.old, e.subject) == (
        "When was the inception of IAAF Combined Events Challenge?", "2006", "1998",
        "IAAF Combined Events Challenge")
    assert e.scope == ("When was the IAAF Combined Events Challenge launched?",)
    assert e.preserve == ("nq question: what is the name of the last episode of spongebob",)
    question = ("What type of sports event is the IAAF Combined Events Challenge, which was "
                "established in 2006?")
    assert [(p.prompt, p.target) for p in e.portability] == [(question, "Athletics")]
    assert {c.protocol for c in imp.spec.claims if c.metric != "locality"} == {"token"}
    # record 81: the new answer is also a true answer, so it cannot be `old`
    assert edits(imp)["zsre_3"].old is None
    assert "old values left out" in header(imp)
    assert "2 further true answers" in header(imp)


def test_mquake_cases() -> None:
    imp = load("mquake", "mquake.json")
    es = edits(imp)
    chain = [es[f"mq_7417_{j}"] for j in range(4)]
    assert all(isinstance(e, TripleEdit) for e in chain)
    assert chain[0].subject == "Hey Jude" and chain[0].new == "Madonna"
    assert chain[0].scope == ("Who performed Hey Jude?",)
    last = chain[3]
    assert last.new == "Arabic" and len(last.portability) == 3
    assert {p.target for p in last.portability} == {"Arabic"}
    assert "The director of The Beatles is" in last.preserve  # an unedited original hop
    # case 7472 shares two edits with 7417: merged, not repeated
    assert "mq_7472_1" not in es and "mq_7472_0" in es
    assert "mq_7472_1->mq_7417_1" in header(imp)
    # case 8563 edits (Portal, developer) against case 7699's edit: dropped whole
    assert not any(n.startswith("mq_8563") for n in es)
    assert "aliases of new_answer" in header(imp)


def test_knowedit_reversal_from_logical_generalization() -> None:
    imp = load("knowedit", "knowedit_wiki_cf.json")
    e = edits(imp)["ke_1"]
    assert isinstance(e, TripleEdit) and e.expect_reversal
    rel = imp.spec.relation(e.relation)
    assert (rel.prompt, rel.reverse) == ("{{ subject }} follows", "{{ object }} is followed by")
    assert render(rel.reverse, subject=e.subject, object=e.new) == "29668 Ipf is followed by"
    assert all(p.target != e.subject for p in e.portability)  # the reverse probe moved
    assert "reversal" in {c.metric for c in imp.spec.claims}
    plain = edits(imp)["ke_0"]
    assert isinstance(plain, PromptEdit) and plain.old == "writer"
    assert ("The occupation of Martin Solares is", "geohasher") in \
        [(p.prompt, p.target) for p in plain.portability]
    assert "ke_3" not in edits(imp)  # the same edit as ke_2, merged into it


def test_knowedit_recent_and_zsre_variants() -> None:
    recent = load("knowedit", "knowedit_wiki_recent.json")
    assert all(e.old is None for e in recent.spec.edits)
    assert "further answers / aliases of portability questions" in header(recent)
    zs = load("knowedit", "knowedit_zsre.json")
    assert edits(zs)["ke_0"].scope == ("In which living being can you find ZIC3?",)
    reversed_ = [e for e in zs.spec.edits if e.expect_reversal]
    assert len(reversed_) == 3
    assert edits(zs)["ke_5"].old is None  # its new answer equals its true one


def test_limit_offset_and_names_use_file_indices() -> None:
    imp = load("zsre", "zsre_mend_eval.json", limit=2, offset=1)
    assert [e.name for e in imp.spec.edits] == ["zsre_1", "zsre_2"]
    assert imp.records == 2
    assert "records 1-2 of 5 -> 2 edits" in header(imp)
    assert "--limit 2 --offset 1" in imp.header[1]


def test_model_and_json_lines(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "counterfact.json").read_text())
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    imp = import_file("counterfact", path, model="smollm2-135m")
    assert imp.spec.model == "smollm2-135m"
    assert len(imp.spec.edits) == 4
    assert parse(imp.text).model == "smollm2-135m"


def test_wrong_dataset_names_the_right_one() -> None:
    with pytest.raises(KmecError) as e:
        load("zsre", "counterfact.json")
    assert "not a zsRE" in e.value.message and "kmec import counterfact" in e.value.hint


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(KmecError, match="did you mean|unknown dataset"):
        load("counterfat", "counterfact.json")
    with pytest.raises(KmecError, match="past the last record"):
        load("counterfact", "counterfact.json", offset=99)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KmecError, match="not JSON"):
        import_file("counterfact", bad)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"src": "q?", "alt": "a", "answers": ["b"]}, {"src": "q2?"}]))
    with pytest.raises(KmecError, match="broken.json: record 1: missing field 'answers'"):
        import_file("zsre", broken)


def test_awkward_strings_are_escaped_and_templates_kept_literal() -> None:
    records = [{"case_id": 1, "requested_rewrite": {
        "prompt": 'The "{{x}}" {} of {{#}}\\ is', "relation_id": "P1",
        "subject": "A \"quoted\"\nsubject", "target_new": {"str": " New "},
        "target_true": {"str": "Old"}},
        "paraphrase_prompts": ["", "ok {{ subject }} paraphrase"],
        "neighborhood_prompts": ["tab\there"]}]
    imp = import_records("counterfact", records)
    e = imp.spec.edits[0]
    rel = imp.spec.relations[0]
    assert render(rel.prompt, subject=e.subject) == 'The "{x}" A "quoted"\nsubject of {#}\\ is'
    assert e.new == "New"  # surrounding blanks trimmed, and said so
    spec = parse(imp.text)
    assert strip_spans(spec) == strip_spans(imp.spec)
    assert "blank scope prompts left out" in header(imp)
    assert "answers with surrounding blanks trimmed" in header(imp)


def test_preserve_prompts_another_edit_changes_are_left_out() -> None:
    def rec(i: int, subject: str, neighbours: list[str]) -> dict:
        return {"src": f"Who made {subject}?", "alt": f"new{i}", "answers": [f"old{i}"],
                "subject": subject, "loc": neighbours[0], "rephrase": f"{subject}: maker?"}

    imp = import_records("zsre", [rec(0, "A", ["Who made B?"]), rec(1, "B", ["Who made C?"])])
    assert edits(imp)["zsre_0"].preserve == ()
    assert edits(imp)["zsre_1"].preserve == ("Who made C?",)
    assert "1 preserve prompts left out because an edit of this spec changes them" in header(imp)


def test_every_dataset_is_documented() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "importers.md").read_text()
    for name in DATASETS:
        assert f"kmec import {name}" in docs


@pytest.mark.parametrize("module", ["kmec.data", "kmec.data.common", "kmec.data.knowedit"])
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
