"""The parser: statements -> Spec nodes, spans, includes, files and folders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kmec.errors import SpecError
from kmec.grammar import analyze, parse, parse_dir, parse_file, parse_many, subjects_of
from kmec.grammar.errors import KEYWORDS
from kmec.grammar.parser import parser
from kmec.spec import MethodHint, PromptEdit, TripleEdit

CAPITAL = '''relation capital {
  prompt "The capital of {{ subject }} is"
  reverse "{{ object }} is the capital of"
}
'''


def same(a, b) -> bool:
    """Equal modulo spans (nodes compare their spans too)."""
    return a.model_dump(mode="json") == b.model_dump(mode="json")


def test_readme_spec_parses_to_the_data_model() -> None:
    spec = parse(CAPITAL + '''
model "smollm2-135m"
seed 3
order sequence
method memit layers 3..5 max_delta 0.05
edit kazakhstan {
  subject "Kazakhstan"  relation capital  "Astana" -> "Nur-Sultan"
  scope "In Kazakhstan, the seat of government is"
  expect reversal
  preserve "The capital of Uzbekistan is" "Kazakhstan's currency is the"
  portability "Nur-Sultan is a city in" -> "Kazakhstan"
}
edit messi { prompt "The 2022 World Cup was won by" -> "Argentina"
             subject "World Cup" old "France" }
claim locality >= 0.95 sample 200 neighbours of capital kl 0.1
claim generality >= 0.8 protocol token
''')
    assert (spec.model, spec.seed, spec.order) == ("smollm2-135m", 3, "sequence")
    assert same(spec.method, MethodHint(method="memit", layers=(3, 4, 5), max_delta=0.05))
    k, m = spec.edits
    assert isinstance(k, TripleEdit) and isinstance(m, PromptEdit)
    assert (k.subject, k.relation, k.old, k.new) == \
        ("Kazakhstan", "capital", "Astana", "Nur-Sultan")
    assert k.expect_reversal and k.preserve == ("The capital of Uzbekistan is",
                                                "Kazakhstan's currency is the")
    assert k.portability[0].prompt == "Nur-Sultan is a city in"
    assert (m.prompt, m.target, m.subject, m.old) == ("The 2022 World Cup was won by",
                                                      "Argentina", "World Cup", "France")
    loc, gen = spec.claims
    assert (loc.metric, loc.threshold, loc.sample, loc.neighbours_of, loc.kl) == \
        ("locality", 0.95, 200, "capital", 0.1)
    assert gen.protocol == "token"


def test_every_node_has_a_span() -> None:
    text = CAPITAL + 'edit k {\n  subject "K" relation capital -> "N"\n}\nclaim efficacy >= 1'
    spec = parse(text, path="x.kmec")
    rel, edit, claim = spec.relations[0], spec.edits[0], spec.claims[0]
    assert (rel.span.file, rel.span.line, rel.span.col, rel.span.end_line) == ("x.kmec", 1, 1, 4)
    assert (edit.span.line, edit.span.end_line, edit.span.end_col) == (5, 7, 2)
    assert (claim.span.line, claim.span.col, claim.span.end_col) == (8, 1, 20)
    assert spec.source == "x.kmec"
    assert "span" not in spec.model_dump()  # spans never reach plans or hashes


def test_old_value_is_optional_and_neighbors_spelling() -> None:
    spec = parse(CAPITAL + 'edit k { subject "K" relation capital -> "N" }\n'
                 "claim locality >= 0.9 neighbors of capital")
    assert spec.edits[0].old is None
    assert spec.claims[0].neighbours_of == "capital"


def test_weights_frozen_and_layer_list() -> None:
    spec = parse("weights frozen\nmethod memory layers 4 6")
    assert same(spec.method, MethodHint(method="memory", layers=(4, 6), frozen=True))


def test_keywords_can_be_names() -> None:
    spec = parse('relation model { prompt "{{ subject }} is" }\n'
                 'edit edit { subject "x" relation model -> "y" }')
    assert spec.relations[0].name == "model" and spec.edits[0].name == "edit"


def test_empty_text_is_an_empty_spec() -> None:
    assert same(parse(""), parse("# only a comment\n"))
    assert parse("").edits == ()


def test_keyword_table_matches_the_grammar() -> None:
    words = {t.pattern.value for t in parser().terminals
             if t.name.isupper() and t.pattern.type == "str" and t.pattern.value.isidentifier()}
    assert words == set(KEYWORDS)


def test_all_errors_are_collected() -> None:
    with pytest.raises(SpecError) as info:
        parse('edit a { subject "x" relation nope -> "y" }\nclaim efficacy >= 2\nmethod rom')
    messages = [d.message for d in info.value.diagnostics]
    assert messages == ["unknown relation `nope`", "threshold 2 is outside [0, 1]",
                        "unknown method `rom`"]


def test_warnings_do_not_raise_but_are_logged(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kmec"):
        spec = parse("claim efficacy >= 0.9")
    assert spec.claims and "claims, but no edits" in caplog.text
    assert analyze("claim efficacy >= 0.9").warnings


def test_includes_merge_in_place(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "rel.kmec").write_text(
        CAPITAL.replace("}\n", '  subjects from "countries.txt"\n}\n', 1)
        + 'edit from_lib { subject "Spain" relation capital -> "Seville" }\nmodel "other"\n')
    (tmp_path / "lib" / "countries.txt").write_text("Chile\n# not a subject\n\nPeru\n")
    main = tmp_path / "main.kmec"
    main.write_text('edit first { subject "France" relation capital -> "Lyon" }\n'
                    'include "lib/rel.kmec"\n'
                    'edit last { subject "Italy" relation capital -> "Milan" }\n')
    analysis = analyze(main.read_text(), path=str(main))
    spec = analysis.spec
    assert [e.name for e in spec.edits] == ["first", "from_lib", "last"]
    assert spec.includes == (str(tmp_path / "lib" / "rel.kmec"),)
    assert spec.model is None  # settings of included files do not apply ...
    assert [w.message for w in analysis.warnings] == ["`model` in an included file is ignored"]
    rel = spec.relation("capital")
    assert rel.subjects_file == "lib/countries.txt"  # ... and paths are rebased on the main file
    assert rel.span.file.endswith("rel.kmec")
    assert subjects_of(spec, rel) == ("Chile", "Peru")


def test_a_file_included_twice_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "rel.kmec").write_text(CAPITAL)
    (tmp_path / "a.kmec").write_text('include "rel.kmec"\n')
    (tmp_path / "main.kmec").write_text('include "rel.kmec"\ninclude "a.kmec"\n')
    spec = parse_file(tmp_path / "main.kmec")
    assert len(spec.relations) == 1
    assert [Path(p).name for p in spec.includes] == ["rel.kmec", "a.kmec"]


def test_includes_can_be_left_unresolved() -> None:
    spec = parse('include "nowhere.kmec"', includes=False)
    assert spec.includes == ("nowhere.kmec",)


def test_errors_in_included_files_point_into_them(tmp_path: Path) -> None:
    (tmp_path / "bad.kmec").write_text('\nedit x { prompt "p" -> "" }\n')
    (tmp_path / "main.kmec").write_text('include "bad.kmec"\n')
    with pytest.raises(SpecError) as info:
        parse_file(tmp_path / "main.kmec")
    d = info.value.diagnostics[0]
    assert (Path(d.span.file).name, d.span.line, d.message) == ("bad.kmec", 2, "empty target")
    assert d.source_line == 'edit x { prompt "p" -> "" }'


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent.kmec", "spec file not found"),
    (lambda p: p, "is a folder, not a spec file"),
])
def test_unreadable_files_are_spec_errors(tmp_path: Path, make, message) -> None:
    with pytest.raises(SpecError, match=message) as info:
        parse_file(make(tmp_path))
    assert info.value.span.line == 1


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.kmec"
    path.write_bytes('model "caf\xe9"'.encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        parse_file(path)


def test_parse_many_aggregates_errors(tmp_path: Path) -> None:
    (tmp_path / "a.kmec").write_text("claim efficacy >= 5\n")
    (tmp_path / "b.kmec").write_text("method rom\n")
    with pytest.raises(SpecError) as info:
        parse_many([tmp_path / "a.kmec", tmp_path / "b.kmec"])
    assert [Path(d.span.file).name for d in info.value.diagnostics] == ["a.kmec", "b.kmec"]


def test_parse_dir_is_sorted_recursive_and_skips_included_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.kmec").write_text('include "sub/part.kmec"\nedit b { prompt "p" -> "q" }\n')
    (tmp_path / "a.kmec").write_text('edit a { subject "S" relation capital -> "T" }\n'
                                     'include "sub/part.kmec"\n')
    (tmp_path / "sub" / "part.kmec").write_text(CAPITAL)  # alone, it is a library
    (tmp_path / "sub" / "z.kmec").write_text('edit z { prompt "p" -> "q" }\n')
    specs = parse_dir(tmp_path)
    assert [Path(s.source).name for s in specs] == ["a.kmec", "b.kmec", "z.kmec"]


def test_parse_dir_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a folder"):
        parse_dir(tmp_path / "nope")


def test_crlf_and_bom_files(tmp_path: Path) -> None:
    path = tmp_path / "win.kmec"
    path.write_bytes(b'\xef\xbb\xbfedit a {\r\n  prompt "p" -> "q"\r\n}\r\n')
    assert parse_file(path).edits[0].target == "q"


def test_huge_numbers_are_located_errors() -> None:
    with pytest.raises(SpecError) as info:
        parse("seed " + "9" * 5000 + "\nmethod rome max_delta 1e999")
    assert [d.message for d in info.value.diagnostics] == [
        "number 999999999999... is too long", "number 1e999 is out of range"]
