"""Prompt templates: sandboxed jinja2, strict about variables."""

from __future__ import annotations

import pytest

from kmec.errors import SpecError
from kmec.grammar import parse, render
from kmec.grammar.templates import inspect, is_template


def test_render_subject_and_object() -> None:
    assert render("The capital of {{ subject }} is", subject="France") == "The capital of France is"
    assert render("{{object}} is the capital of", subject="France", object="Paris") == \
        "Paris is the capital of"


def test_filters_work_and_whitespace_is_kept() -> None:
    assert render("{{ subject | lower }} \n", subject="FRANCE") == "france \n"


def test_plain_text_renders_as_itself() -> None:
    assert render("Paris is in", subject="x") == "Paris is in"


def test_missing_object_is_an_error_not_an_empty_string() -> None:
    with pytest.raises(SpecError, match="undefined variable"):
        render("{{ object }} is the capital of", subject="France")


def test_unknown_variable_and_syntax_error() -> None:
    with pytest.raises(SpecError, match="undefined"):
        render("{{ country }}", subject="x")
    with pytest.raises(SpecError, match="syntax error"):
        render("{{ subject }", subject="x")


def test_sandbox_blocks_internals() -> None:
    with pytest.raises(SpecError, match="may not use function calls"):
        render("{{ subject.__class__.__mro__[1].__subclasses__() }}", subject="x")
    with pytest.raises(SpecError, match="may not use attribute access"):
        render("{{ subject.__class__ }}", subject="x")


def test_no_html_escaping() -> None:
    assert render("{{ subject }}", subject="<b>&") == "<b>&"


def test_inspect() -> None:
    assert inspect("{{ subject }} and {{ object | upper }}").variables == {"subject", "object"}
    assert "loops" in (inspect("{% for x in y %}{{ x }}{% endfor %}").error or "")
    assert inspect("{{ subject }").error is not None
    assert is_template("{# note #} x") and not is_template("a { b } c")


def test_pathological_templates_are_errors_not_crashes() -> None:
    assert inspect("{{ " + "(" * 5000 + " }}").error == "the template nests too deeply"
    with pytest.raises(SpecError):
        render("{{ " + "[" * 5000 + " }}", subject="x")


def test_the_rome_placeholder_gets_a_did_you_mean():
    """`prompt "{} is"` (the ROME/EasyEdit habit) is pointed at, with the kmec spelling."""
    with pytest.raises(SpecError) as e:
        parse('relation capital { prompt "The capital of {} is" }\n')
    d = e.value.diagnostics[0]
    assert "does not use {{ subject }}" in d.message and (d.span.line, d.span.col) == (1, 27)
    assert 'did you mean "The capital of {{ subject }} is"?' in d.hint
