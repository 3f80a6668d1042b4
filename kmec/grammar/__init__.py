"""The ``.kmec`` language: text -> Spec -> text.

Contents:
    parse()        text -> checked Spec (includes merged); one SpecError with every error
    parse_file()   a spec file -> Spec
    parse_many()   files -> specs (one SpecError for all)
    parse_dir()    every ``*.kmec`` under a folder -> specs
    analyze()      like parse, but returns the Spec and every diagnostic (warnings too)
    check()        semantic checks on any Spec -> diagnostics
    format_spec()  Spec -> canonical text (``parse(format_spec(s))`` equals ``s``)
    format_text()  text -> canonical text, keeping comments (what ``kmec fmt`` writes)
    render()       fill a prompt template (jinja2 sandbox) with a subject / object
    subjects_of()  a relation's subjects, inline and from its file

The language is described in docs/language.md; the grammar is ``kmec.lark``.
"""

from __future__ import annotations

from kmec.grammar.check import check
from kmec.grammar.formatter import format_spec, format_text
from kmec.grammar.loader import (
    Analysis,
    analyze,
    analyze_dir,
    analyze_file,
    parse,
    parse_dir,
    parse_file,
    parse_many,
    spec_files,
    subjects_of,
)
from kmec.grammar.templates import render

__all__ = [
    "Analysis",
    "analyze",
    "analyze_dir",
    "analyze_file",
    "check",
    "format_spec",
    "format_text",
    "parse",
    "parse_dir",
    "parse_file",
    "parse_many",
    "render",
    "spec_files",
    "subjects_of",
]
